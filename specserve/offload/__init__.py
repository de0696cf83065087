"""Offloading: serve a model whose layers live in CPU memory, streamed to the GPU per forward."""
