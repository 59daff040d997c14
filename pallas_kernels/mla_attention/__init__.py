"""Multi-head latent attention (DeepSeek's MLA) over paged latent entries, absorbed form.

`reference.py` is the pure-JAX definition the kernels are checked against; `tpu.py` the Mosaic TPU kernel
(the ragged paged kernel reading each latent page once for keys and values); `gpu.py` the Mosaic GPU
(Hopper) kernel for decode-sized steps, keys as wgmma's rows and the few heads' queries as its columns.
The model reaches them through jaxinfer/layers/attention.py's `mla_attention`, which picks by the
platform it is lowered for: a kernel where its `supports` takes the shapes, else XLA: the paged
attention's blockwise XLA path over the same pages as keys and values, its outputs cut to value_dim.
"""

from pallas_kernels.mla_attention import reference as _reference
from pallas_kernels.mla_attention import gpu, tpu

reference = _reference.mla_attention

__all__ = ["gpu", "reference", "tpu"]
