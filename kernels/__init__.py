"""Attention kernels: each Triton kernel lives beside a plain PyTorch reference of the same signature."""
