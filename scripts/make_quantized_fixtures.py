"""Make tiny quantized HF checkpoints (AWQ, GPTQ, compressed-tensors) and their reference logits.

Each is a tiny random Llama (hidden 64, 2 layers, vocab 256, as scripts/make_hf_fixtures.py) whose
projections are quantized and stored as its format stores them:

    AWQ (GEMM)          packed here by AutoAWQ's documented layout (WQLinear_GEMM.from_linear: 8 outputs
                        an int32 in the order 0 2 4 6 1 3 5 7, zeros packed alike, fp16 scales)
    GPTQ                packed here by AutoGPTQ's layout (QuantLinear.pack: 32/bits inputs an int32 in
                        qweight, outputs packed in qzeros, "gptq" (v1) storing zero - 1, "gptq_v2" the
                        zero; g_idx; act-order as desc_act makes it: groups over a permutation)
    compressed-tensors  quantized and packed by the compressed-tensors library itself (its
                        calculate_qparams, ModelCompressor.compress_model, update_config)

The reference is HF transformers (PyTorch, float32, eager) on the float model whose projections are
the dequantized weights: for AWQ and GPTQ by this script's own (q - z) * s over the levels it
packed, for compressed-tensors by the library's fake_quantize. CI reads only what this writes under
tests/data/hf_quantized/. Run with torch, transformers and compressed-tensors installed (a separate
environment; none of them is a dependency of jaxinfer):

    python scripts/make_quantized_fixtures.py [--out tests/data/hf_quantized]

Each fixture directory: config.json (with its quantization_config), safetensors, and
reference.npz holding per prompt the prompt ids, greedily generated ids and the float32 logits at
every position of prompt + generation.
"""

import argparse
import json
import pathlib
import re

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from make_hf_fixtures import greedy_reference  # scripts/, beside this one

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=True, attn_implementation="eager")
PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj$")
PROMPT_LENS = (8,)
DECODE_STEPS = 6

# name -> how its projections are quantized and stored
CASES = {
    "awq_g32": dict(fmt="awq", group=32),
    "gptq_v1_sym_g32": dict(fmt="gptq", bits=4, group=32, sym=True, v1=True),
    "gptq_v2_asym_g64": dict(fmt="gptq", bits=4, group=64, sym=False, v1=False),
    # act-order, v1 zeros, asymmetric; saved in 3 shards that split each Linear's parts
    "gptq_act_order_g32": dict(fmt="gptq", bits=4, group=32, sym=False, v1=True, act_order=True, shards=3),
    "gptq_int8_channel": dict(fmt="gptq", bits=8, group=None, sym=True, v1=False),
    # compressed-tensors: `fmt` is the format the library picks for the scheme (weight-only int: packed;
    # int8 or fp8 with activations quantized too: int-quantized / float-quantized; weight-only fp8: naive).
    # Activations stay float here, and in the reference.
    "ct_int4_asym_g32": dict(fmt="pack-quantized", bits=4, type="int", symmetric=False, strategy="group", group=32),
    "ct_w8a16_int8_g64": dict(fmt="pack-quantized", bits=8, type="int", symmetric=True, strategy="group", group=64),
    "ct_w8a8_int8_channel": dict(fmt="int-quantized", bits=8, type="int", symmetric=True, strategy="channel",
                                 activations=True),
    "ct_fp8_dynamic_channel": dict(fmt="float-quantized", bits=8, type="float", symmetric=True, strategy="channel",
                                   activations=True),
    "ct_fp8_tensor": dict(fmt="naive-quantized", bits=8, type="float", symmetric=True, strategy="tensor"),
}


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """As make_hf_fixtures, with every float parameter rounded to float16 (stored so, to keep files small)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())


def projections(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if PROJECTION.fullmatch(name)}


# --- AWQ and GPTQ: levels by round-to-nearest min/max, packed by the formats' layouts ----------------

def rtn_levels(w: np.ndarray, groups: np.ndarray, n_groups: int, bits: int, sym: bool):
    """w [out, in] float32, groups [in] (each input's group) -> levels q [in, out] 0..2^bits-1, scales
    [groups, out] (float16-rounded, as stored), zeros [groups, out] integers; w ~ (q - z) s."""
    maxq = (1 << bits) - 1
    out = w.shape[0]
    scales, zeros = np.zeros((n_groups, out), np.float32), np.zeros((n_groups, out), np.int64)
    for g in range(n_groups):
        cols = w[:, groups == g]
        lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        if sym:  # GPTQ's symmetric quantizer: zero at the midpoint
            hi = np.maximum(-lo, hi)
            lo = -hi
            s = np.float16((hi - lo) / maxq).astype(np.float32)
            z = np.full(out, (maxq + 1) // 2)
        else:
            s = np.float16((hi - lo) / maxq).astype(np.float32)
            z = np.clip(np.round(-lo / s), 0, maxq).astype(np.int64)
        scales[g], zeros[g] = s, z
    q = np.clip(np.round(w.T / scales[groups]) + zeros[groups], 0, maxq).astype(np.int64)  # [in, out]
    return q, scales, zeros


def dequantize_levels(q, scales, zeros, groups) -> np.ndarray:
    """The float weight [out, in] the levels stand for: (q - z) * s, each input by its own group."""
    return ((q - zeros[groups]) * scales[groups]).T.astype(np.float32)


def pack_rows(fields: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] unsigned fields -> int32 [R * bits / 32, C]: rows i*per .. i*per+per-1 in word row i, the
    first lowest (GPTQ's qweight)."""
    per = 32 // bits
    f = fields.astype(np.uint32).reshape(-1, per, fields.shape[1])
    word = np.zeros((f.shape[0], f.shape[2]), np.uint32)
    for j in range(per):
        word |= f[:, j] << np.uint32(bits * j)
    return word.view(np.int32)


def pack_awq(fields: np.ndarray) -> np.ndarray:
    """[R, C] 4-bit fields -> int32 [R, C / 8], as WQLinear_GEMM.from_linear: word c's nibble i holds
    column 8c + order_map[i]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    f = fields.astype(np.uint32)
    word = np.zeros((f.shape[0], f.shape[1] // 8), np.uint32)
    for col in range(word.shape[1]):
        for i in range(8):
            word[:, col] |= f[:, col * 8 + order_map[i]] << np.uint32(4 * i)
    return word.view(np.int32)


def quantize_awq(model, case, gen) -> tuple[dict, dict]:
    tensors, group = {}, case["group"]
    for name, lin in projections(model).items():
        w = lin.weight.detach().numpy()
        k = w.shape[1]
        groups = np.arange(k) // group
        q, s, z = rtn_levels(w, groups, k // group, 4, sym=False)
        lin.weight.data = torch.from_numpy(dequantize_levels(q, s, z, groups))
        tensors[f"{name}.qweight"] = pack_awq(q)
        tensors[f"{name}.qzeros"] = pack_awq(z)
        tensors[f"{name}.scales"] = s.astype(np.float16)
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    return tensors, config


def quantize_gptq(model, case, gen) -> tuple[dict, dict]:
    tensors, bits = {}, case["bits"]
    rng = np.random.default_rng(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
    for name, lin in projections(model).items():
        w = lin.weight.detach().numpy()
        k = w.shape[1]
        group = case["group"] or k
        if case.get("act_order"):
            # desc_act: columns are quantized in a permuted order (GPTQ's by the Hessian's diagonal), the
            # j-th of them in group j // g, so g_idx[perm[j]] = j // g.
            perm = rng.permutation(k)
            groups = np.empty(k, np.int64)
            groups[perm] = np.arange(k) // group
        else:
            groups = np.arange(k) // group
        q, s, z = rtn_levels(w, groups, k // group, bits, sym=case["sym"])
        lin.weight.data = torch.from_numpy(dequantize_levels(q, s, z, groups))
        stored_z = z - 1 if case["v1"] else z  # v1 ("gptq") stores zero - 1
        assert (stored_z >= 0).all(), "a v1 zero of 0 is stored as -1, which its nibble cannot hold"
        tensors[f"{name}.qweight"] = pack_rows(q, bits)
        tensors[f"{name}.qzeros"] = pack_rows(stored_z.T, bits).T.copy()  # packed along the outputs
        tensors[f"{name}.scales"] = s.astype(np.float16)
        tensors[f"{name}.g_idx"] = groups.astype(np.int32)
    config = {"quant_method": "gptq", "bits": bits, "group_size": case["group"] or -1,
              "desc_act": bool(case.get("act_order")), "sym": case["sym"], "static_groups": False,
              "true_sequential": True, "damp_percent": 0.01,
              "checkpoint_format": "gptq" if case["v1"] else "gptq_v2"}
    return tensors, config


def save_awq_gptq(model, case, gen, target: pathlib.Path) -> None:
    quantize = quantize_awq if case["fmt"] == "awq" else quantize_gptq
    tensors, qconfig = quantize(model, case, gen)
    for name, p in model.state_dict().items():
        module = name.rpartition(".")[0]
        if not PROJECTION.fullmatch(module) and name != "lm_head.weight":
            tensors[name] = p.numpy().astype(np.float16)
    model.config.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = qconfig
    config["torch_dtype"] = config["dtype"] = "float16"
    (target / "config.json").write_text(json.dumps(config, indent=1))
    shards = case.get("shards", 1)
    if shards == 1:
        safetensors.numpy.save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        return
    # Shard by part kind, so that no Linear has all its parts in one file.
    kinds = [("qweight", "embed", "norm"), ("scales", "g_idx"), ("qzeros",)]
    weight_map = {}
    for i, kind in enumerate(kinds):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t for n, t in tensors.items() if any(s in n for s in kind) and n not in weight_map}
        weight_map.update({n: file for n in part})
        safetensors.numpy.save_file(part, target / file, metadata={"format": "pt"})
    assert set(weight_map) == set(tensors)
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))


# --- compressed-tensors: the library quantizes and packs ---------------------------------------------

def save_compressed_tensors(model, case, target: pathlib.Path) -> dict:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=case["bits"], type=case["type"], symmetric=case["symmetric"],
                            strategy=case["strategy"], group_size=case.get("group"))
    acts = (QuantizationArgs(num_bits=8, type=case["type"], symmetric=True, strategy="token", dynamic=True)
            if case.get("activations") else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, qconfig)
    dequantized = {}
    with torch.no_grad():
        for name, lin in projections(model).items():
            w = lin.weight
            if case["strategy"] == "group":
                view = w.reshape(w.shape[0], -1, case["group"])
                lo, hi = view.amin(-1), view.amax(-1)
            elif case["strategy"] == "channel":
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                lo, hi = w.amin().reshape(1), w.amax().reshape(1)
            scale, zero = calculate_qparams(lo, hi, args)
            lin.weight_scale.data = scale.to(lin.weight_scale.dtype).reshape(lin.weight_scale.shape)
            if hasattr(lin, "weight_zero_point"):
                lin.weight_zero_point.data = zero.to(lin.weight_zero_point.dtype).reshape(lin.weight_zero_point.shape)
            zp = getattr(lin, "weight_zero_point", None)
            dequantized[name] = fake_quantize(w, lin.weight_scale, zp, args).clone()
    compressor = ModelCompressor.from_pretrained_model(model)  # the format the library picks for the scheme
    fmt = getattr(compressor.quantization_config.format, "value", compressor.quantization_config.format)
    assert fmt == case["fmt"], (fmt, case["fmt"])
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)
    # The library saves the float tensors as the model holds them (float32): store them as float16
    # (exactly, randomize rounded them), as quantized checkpoints are.
    path = target / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    for name, t in tensors.items():
        if t.dtype == torch.float32 and not name.rpartition(".")[2].startswith("weight_"):
            tensors[name] = t.half()
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    return dequantized


def reference_model(float_model, dequantized: dict | None):
    """A float32 model with the float model's weights, its projections the dequantized ones."""
    model = transformers.AutoModelForCausalLM.from_config(float_model.config, dtype=torch.float32)
    model.load_state_dict(float_model.state_dict(), strict=False)
    with torch.no_grad():
        for name, lin in projections(model).items():
            source = dequantized[name] if dequantized is not None else projections(float_model)[name].weight
            lin.weight.copy_(source)
    model.eval()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tests/data/hf_quantized")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    import compressed_tensors

    for index, (name, case) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(2000 + index)
        config = transformers.LlamaConfig(**CONFIG)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, gen)
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*.safetensors*"):
            old.unlink()
        if case["fmt"] in ("awq", "gptq"):
            save_awq_gptq(model, case, gen, target)  # the model's projections become the dequantized weights
            reference = reference_model(model, None)
        else:
            float_copy = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            float_copy.load_state_dict(model.state_dict())
            reference = reference_model(float_copy, save_compressed_tensors(model, case, target))
        arrays = greedy_reference(reference, gen, CONFIG["vocab_size"], PROMPT_LENS, DECODE_STEPS)
        np.savez_compressed(target / "reference.npz", **arrays)
        (target / "reference.json").write_text(json.dumps(
            {"transformers": transformers.__version__, "torch": torch.__version__,
             "compressed_tensors": compressed_tensors.__version__, "case": case,
             "prompts": len(PROMPT_LENS), "decode_steps": DECODE_STEPS}, indent=1))
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"{name}: {size / 1024:.0f} KB -> {target}")


if __name__ == "__main__":
    main()
