"""DeepSeek from GGUF (llama.cpp's `deepseek2`): the tiny HF DeepSeek-V2 checkpoint written as llama.cpp's
converter writes it (MLA as MQA in the metadata, experts stacked, the router bias renamed, kv_b whole as in
older files or split into a transposed k_b and a v_b as in newer ones) loads to HF transformers' logits."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import loader
from jaxinfer.errors import CheckpointError
from jaxinfer.runner.model_runner import ModelRunner
from jaxinfer.sharding import make_mesh
from tests.paged_runs import teacher_forced_logits

NAMES = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
         "self_attn.q_proj.weight": "attn_q", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa",
         "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm", "self_attn.o_proj.weight": "attn_output",
         "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
         "mlp.gate.weight": "ffn_gate_inp", "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp",
         "mlp.shared_experts.up_proj.weight": "ffn_up_shexp", "mlp.shared_experts.down_proj.weight": "ffn_down_shexp"}


def write_deepseek_gguf(path, hf_dir, split_kv_b: bool, drop=()):
    import json

    hp = json.loads((hf_dir / "config.json").read_text())
    rope = hp["rope_parameters"]
    H, N, V = hp["num_attention_heads"], hp["qk_nope_head_dim"], hp["v_head_dim"]
    L, R, X = hp["kv_lora_rank"], hp["qk_rope_head_dim"], hp["n_routed_experts"]
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(1)  # MLA written as MQA
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_leading_dense_block_count(hp["first_k_dense_replace"])
    w.add_vocab_size(hp["vocab_size"])
    w.add_kv_lora_rank(L)
    w.add_key_length(L + R)
    w.add_value_length(L)
    w.add_key_length_mla(N + R)
    w.add_value_length_mla(V)
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_count(X)
    w.add_expert_used_count(hp["num_experts_per_tok"])
    w.add_expert_shared_count(hp["n_shared_experts"])
    w.add_expert_weights_scale(hp["routed_scaling_factor"])
    w.add_expert_weights_norm(hp["norm_topk_prob"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(hp["n_group"])
    w.add_expert_group_used_count(hp["topk_group"])
    w.add_rope_dimension_count(R)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    # A byte-level tokenizer over the 256-token vocabulary: bytes 0..254, then one merge (two spaces).
    from jaxinfer.tokenizer import _bytes_to_unicode
    w.add_tokenizer_model("gpt2")
    w.add_token_list([_bytes_to_unicode()[b] for b in range(hp["vocab_size"] - 1)] + ["\u0120\u0120"])
    w.add_token_merges(["\u0120 \u0120"])
    tensors = load_file(hf_dir / "model.safetensors")
    out = {"token_embd.weight": tensors["model.embed_tokens.weight"],
           "output_norm.weight": tensors["model.norm.weight"], "output.weight": tensors["lm_head.weight"]}
    for i in range(hp["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for hf, g in NAMES.items():
            if pre + hf in tensors:
                out[f"blk.{i}.{g}.weight"] = tensors[pre + hf]
        kv_b = tensors[pre + "self_attn.kv_b_proj.weight"]
        if split_kv_b:
            k_b, v_b = np.split(kv_b.reshape(H, N + V, L), [N], axis=1)
            out[f"blk.{i}.attn_k_b.weight"] = k_b.transpose(0, 2, 1)
            out[f"blk.{i}.attn_v_b.weight"] = v_b
        else:
            out[f"blk.{i}.attn_kv_b.weight"] = kv_b
        if pre + "mlp.experts.0.gate_proj.weight" in tensors:
            for proj, g in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
                experts = [tensors[f"{pre}mlp.experts.{e}.{proj}.weight"] for e in range(X)]
                out[f"blk.{i}.{g}.weight"] = np.stack(experts)
    for name, t in out.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("split_kv_b", [False, True])
def test_a_deepseek2_gguf_gives_hf_transformers_logits(data_dir, tmp_path, split_kv_b):
    hf_dir = data_dir / "hf_tiny" / "deepseek_v2"
    write_deepseek_gguf(tmp_path / "m.gguf", hf_dir, split_kv_b)
    loaded = loader.load(tmp_path / "m.gguf", dtype=jnp.float32, mesh=make_mesh(), progress=False)
    cfg = loaded.config
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.num_shared_experts) == ("group_limited_greedy", 4, 2, 2)
    ref = np.load(hf_dir / "reference.npz")
    runner = ModelRunner(cfg, loaded.graphdef, loaded.state, make_mesh(), num_pages=32, page_size=4)
    ours = teacher_forced_logits(runner, [ref["prompt_0"], ref["prompt_1"]], [ref["generated_0"], ref["generated_1"]])
    for i in range(2):
        np.testing.assert_allclose(ours[i], ref[f"logits_{i}"][:-1], atol=1e-4, rtol=0)


def test_a_deepseek2_gguf_missing_half_of_a_split_kv_b_is_refused_by_name(data_dir, tmp_path):
    write_deepseek_gguf(tmp_path / "m.gguf", data_dir / "hf_tiny" / "deepseek_v2", True, drop={"blk.1.attn_v_b.weight"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn"):
        loader.load(tmp_path / "m.gguf", dtype=jnp.float32, mesh=make_mesh(), progress=False)
