"""Kernel tests run through Triton's interpreter where there is no CUDA device.

TRITON_INTERPRET is read when ``triton.jit`` decorates a kernel, so it must be set before any
kernel module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
