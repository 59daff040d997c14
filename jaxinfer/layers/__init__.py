"""Building blocks that model families are written in.

    param.py          declaring a parameter once: shape, dtype, logical axes, init
    linear.py         Linear and Embed, and `einsum`, the one matmul every projection goes through
    norm.py           RMSNorm
    rope.py           rotary position embeddings and their scalings
    kv.py             what a layer keeps per token in the paged KV cache, and the write into it
    attention.py      the one paged-attention function, dispatching to an implementation
    attention_xla.py  the plain-JAX paged attention (CPU, and shapes no kernel takes)
"""
