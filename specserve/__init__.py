"""specserve: low-latency LLM serving with tree-based speculative decoding."""

__version__ = "0.1.0"
