"""Llama-family models: sources, loaders (GGUF, safetensors folders), our forward."""
