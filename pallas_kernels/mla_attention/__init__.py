"""Multi-head latent attention (DeepSeek's MLA) over paged latent entries, absorbed form.

`reference.py` is the pure-JAX definition the kernels are checked against; `tpu.py` the Mosaic TPU kernel
(the ragged paged kernel reading each latent page once for keys and values). `mla_attention` is the one
entry point the model reaches (through jaxinfer/layers/attention.py), picking by the platform it is
lowered for: the TPU kernel on TPU where `supports` takes the shapes, else XLA: the paged attention's
blockwise XLA path over the same pages as keys and values, its outputs cut to value_dim.
A GPU kernel is still to come (the Mosaic GPU paged kernel stops at head_dim 256).
"""

from pallas_kernels.mla_attention import reference as _reference
from pallas_kernels.mla_attention import tpu

reference = _reference.mla_attention

__all__ = ["reference", "tpu"]
