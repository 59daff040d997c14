"""A Linear weight that arrives already quantized (GGUF blocks, checkpoints/gguf_repack.py; AWQ, GPTQ
and compressed-tensors, checkpoints/hf_quantized.py), carried from the file to `params.place_params`
without ever being expanded to floats.

It is in HF orientation, which is the kernels' [N, K]: values [out_features, in_features], and
scales (and zeros) [in_features // g, out_features], in pallas_kernels/quantized_matmul's format.
An act-order scheme (GPTQ desc_act) stores the input channels sorted by group and says which
of x's channels each one is in `input_order` [in_features] int32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pallas_kernels.quantized_matmul import QuantScheme


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    values: np.ndarray  # [out, in], the scheme's values dtype
    scales: np.ndarray  # [in // g, out] float32
    zeros: np.ndarray | None  # [in // g, out] float32, zero-point schemes only
    scheme: QuantScheme
    input_order: np.ndarray | None = None  # [in] int32, act-order schemes only

    @property
    def shape(self) -> tuple[int, int]:
        """The float weight's HF shape, [out, in]."""
        return tuple(self.values.shape)

    def with_rows(self, reorder: Callable[[np.ndarray], np.ndarray]) -> "QuantizedTensor":
        """The same weight with its output rows reordered by `reorder` (a function of an array whose first
        axis is the outputs), applied alike to values, scales and zeros."""
        def cols(a):
            return None if a is None else np.ascontiguousarray(reorder(a.T).T)
        return QuantizedTensor(np.ascontiguousarray(reorder(self.values)), cols(self.scales), cols(self.zeros),
                               self.scheme, self.input_order)

    def parts(self) -> dict[str, np.ndarray]:
        """{"values", "scales"(, "zeros")(, "input_order")}: the arrays a QuantizedLinear holds."""
        out = {"values": self.values, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.input_order is not None:
            out["input_order"] = self.input_order
        return out
