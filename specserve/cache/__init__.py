"""The paged KV cache: a pure-Python block pool and manager, and the tensors they index."""
