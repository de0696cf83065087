"""The engine: requests in, tokens out. Knows nothing of HTTP."""
