"""Weights as GGUF stores them: `QuantTensor` keeps the raw blocks of one 2-D
tensor and knows how to dequantize them; `SegmentedTensor` stacks several along
the output rows (a fused QKV or gate+up whose parts have different types, as in
Q4_K_M files) without copying per forward.

Shapes are in torch order: (rows, cols) = (out_features, in_features); GGUF's
ne[0] is cols. Quantized data is a uint8 tensor [rows, row_bytes]; F32/F16/BF16
data is a tensor of that dtype [rows, cols].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import FLOAT_DTYPES, GGMLType
from .dequant import dequantize


@dataclass(frozen=True)
class QuantTensor:
    data: torch.Tensor
    qtype: GGMLType
    shape: tuple[int, int]

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_DTYPES

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix, [rows, cols]."""
        return self.dequantize_rows(None, dtype)

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Selected rows only (an embedding lookup reads just these blocks)."""
        data = self.data if rows is None else self.data[rows]
        if self.is_float:
            return data.to(dtype)
        return dequantize(data, self.qtype).to(dtype)

    def take_rows(self, index: torch.Tensor) -> QuantTensor:
        """Rows gathered in a new order: whole rows of blocks move, nothing is requantized."""
        return QuantTensor(self.data[index].contiguous(), self.qtype, (len(index), self.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> QuantTensor:
        return QuantTensor(self.data.to(device), self.qtype, self.shape)


@dataclass(frozen=True)
class RowStack:
    """Row-wise stack of 2-D weights of one column count, each part in its own format (the
    fused QKV or gate+up of a Q4_K_M file mixes types). Each layout's stack subclasses it."""
    parts: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])

    def to(self, device: torch.device | str):
        return type(self)(tuple(p.to(device) for p in self.parts))


class SegmentedTensor(RowStack):
    """Row-wise concatenation of QuantTensors of mixed types."""


Weight = QuantTensor | SegmentedTensor


def concat_rows(parts: list[QuantTensor]) -> Weight:
    """Fuse weights along the output rows, once at load.

    Neighbours of one type are merged into one QuantTensor (their raw rows
    concatenate); a SegmentedTensor remains only where types really differ.
    """
    if any(p.shape[1] != parts[0].shape[1] for p in parts):
        raise ValueError(f"cannot fuse weights with different column counts: {[p.shape for p in parts]}")
    merged: list[QuantTensor] = []
    for p in parts:
        if merged and merged[-1].qtype == p.qtype and merged[-1].data.dtype == p.data.dtype:
            last = merged[-1]
            merged[-1] = QuantTensor(torch.cat([last.data, p.data]), p.qtype, (last.shape[0] + p.shape[0], p.shape[1]))
        else:
            merged.append(p)
    return merged[0] if len(merged) == 1 else SegmentedTensor(tuple(merged))
