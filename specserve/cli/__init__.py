"""Command line: ``specserve generate`` and ``specserve serve``."""
