"""The OpenAI-compatible HTTP server: aiohttp over one engine thread (``specserve serve``)."""
