"""Make tiny random-weight HF checkpoints and their reference logits.

Runs HF transformers (PyTorch, float32, eager attention) as the independent
reference; CI only reads what this writes under tests/data/hf_tiny/. Run with an
environment that has torch and transformers:

    python scripts/make_hf_fixtures.py [--out tests/data/hf_tiny]

For each model: config.json + safetensors, and reference.npz holding, per
prompt, the prompt ids, 16 greedily generated ids, and the float32 logits at
every position of prompt + generation.
"""

import argparse
import json
import pathlib

import numpy as np
import torch
import transformers

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager")

MODELS = {
    # GQA (8 query heads over 2 KV heads), untied, saved in shards with an index.
    "llama_gqa": (transformers.LlamaConfig, dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)),
    # MQA, tied embeddings, Llama-3.1 RoPE scaling with a short original context so it bites.
    "llama31_tied": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    # qkv bias, tied.
    "qwen2_bias": (transformers.Qwen2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    # q/k RMSNorm, head_dim (32) unlike hidden/heads (16), untied.
    "qwen3_qknorm": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # sliding window shorter than the sequences.
    "mistral_window": (transformers.MistralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)),
    # MLA without a q LoRA, V2's softmax routing limited to the best 2 of 4 groups (a group scored by its
    # best expert), shared experts, a dense first layer, YaRN with mscale_all_dim (the softmax scale moves)
    # and a short original context (the ramp bites); the experts saved one tensor per expert.
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, kv_lora_rank=32, q_lora_rank=None,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=24, n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                             beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    # MLA with a q LoRA, V3's sigmoid routing with a (randomized) score-correction bias over the best 2 of 4
    # groups (a group scored by its best two), renormalized, scaled; interleaved rope; YaRN whose mscale and
    # mscale_all_dim differ (cos and sin scaled too); the experts saved fused.
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5))),
    # Qwen3's attention with experts: layer 0 dense (mlp_only_layers), then experts, renormalized top-2 of 8.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[0], tie_word_embeddings=False)),
    # Mixtral: experts in every layer (top-2 of 4, always renormalized), a sliding window shorter than the text.
    "mixtral": (transformers.MixtralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, tie_word_embeddings=False)),
}
# transformers 5 saves experts one tensor per expert (as DeepSeek's own checkpoints are); these are rewritten
# fused, as transformers 5 holds them in memory (and some conversions save them).
FUSED = {"deepseek_v3"}
PROMPT_LENS = (13, 21)
DECODE_STEPS = 16


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # HF initialises it to zeros, which would test nothing
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def greedy_reference(model, gen: torch.Generator, vocab: int, prompt_lens, decode_steps: int) -> dict:
    """reference.npz's arrays: per prompt (random ids of each length, drawn from `gen`) the prompt, the
    `decode_steps` ids greedy decoding appends, and the float32 logits at every position of both."""
    arrays = {}
    for i, length in enumerate(prompt_lens):
        prompt = torch.randint(0, vocab, (1, length), generator=gen)
        generated = prompt
        with torch.no_grad():
            # Plain greedy argmax (no generate(): its processors would bend EOS).
            for _ in range(decode_steps):
                next_id = model(generated).logits[0, -1].argmax()
                generated = torch.cat([generated, next_id.view(1, 1)], dim=1)
            logits = model(generated).logits[0].float().numpy()
        arrays[f"prompt_{i}"] = prompt[0].numpy().astype(np.int32)
        arrays[f"generated_{i}"] = generated[0, length:].numpy().astype(np.int32)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
    return arrays


def fuse_experts(target: pathlib.Path) -> None:
    """Rewrite per-expert tensors (`experts.{e}.{gate,up,down}_proj.weight`) fused, as transformers 5 holds
    them: `experts.gate_up_proj` [X, 2 I, E] (gate's rows, then up's) and `experts.down_proj` [X, E, I]."""
    import re

    from safetensors.numpy import load_file, save_file

    path = target / "model.safetensors"
    tensors, out, experts = load_file(path), {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m is None:
            out[name] = t
        else:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for prefix, projs in experts.items():
        stack = {p: np.stack([e[i] for i in range(len(e))]) for p, e in projs.items()}
        out[f"{prefix}.gate_up_proj"] = np.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1)
        out[f"{prefix}.down_proj"] = stack["down_proj"]
    save_file(out, path, metadata={"format": "pt"})


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tests/data/hf_tiny")
    parser.add_argument("--only", default=None, help="comma-separated names: make only these")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    torch.manual_seed(0)
    for index, (name, (config_cls, extra)) in enumerate(MODELS.items()):
        if args.only and name not in args.only.split(","):
            continue
        gen = torch.Generator().manual_seed(1000 + index)
        config = config_cls(**{**COMMON, **extra})
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        randomize(model, gen)
        model.eval()
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        shard = dict(max_shard_size="100KB") if name == "llama_gqa" else {}
        model.save_pretrained(target, **shard)
        if name in FUSED:
            fuse_experts(target)
        np.savez_compressed(target / "reference.npz", **greedy_reference(model, gen, VOCAB, PROMPT_LENS, DECODE_STEPS))
        (target / "reference.json").write_text(json.dumps(
            {"transformers": transformers.__version__, "torch": torch.__version__,
             "prompts": len(PROMPT_LENS), "decode_steps": DECODE_STEPS}, indent=1))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {target}")


if __name__ == "__main__":
    main()
