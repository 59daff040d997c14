"""A Linear weight that arrives already quantized (GGUF blocks; AWQ, GPTQ and compressed-tensors
next), carried from the file to `params.place_params` without ever being expanded to floats.

It is in HF orientation, which is the kernels' [N, K]: values [out_features, in_features], and
scales (and zeros) [in_features // g, out_features], in pallas_kernels/quantized_matmul's format.
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
                               self.scheme)

    def parts(self) -> dict[str, np.ndarray]:
        """{"values", "scales"(, "zeros")}: the arrays a QuantizedLinear holds."""
        out = {"values": self.values, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out
