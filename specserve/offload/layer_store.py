"""Decoder layers as flat buffers: every layer of a model has the same parameter layout, so one
layout maps any layer's flat buffer to its named parameter views.

    flat buffer of one layer  [numel]  = cat(param.flatten() for param in layout order)
    layout                    (name, shape, offset) per parameter
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, layer: nn.Module) -> FlatLayout:
        names, shapes, offsets, offset = [], [], [], 0
        for name, param in layer.named_parameters():
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(offset)
            offset += math.prod(param.shape)
        return cls(tuple(names), tuple(shapes), tuple(offsets), offset)

    def flatten(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Copy a layer's parameters into ``out`` [numel] (its dtype and device)."""
        params = dict(layer.named_parameters())
        for name, shape, offset in zip(self.names, self.shapes, self.offsets):
            out[offset : offset + math.prod(shape)].copy_(params[name].detach().flatten())
        return out

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named parameter views into a flat buffer (no copy)."""
        return {
            name: flat[offset : offset + math.prod(shape)].view(shape)
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()
