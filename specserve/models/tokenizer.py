"""Tokenizers through transformers: from a checkpoint folder, or from the GGUF file itself."""

from __future__ import annotations

import warnings
from pathlib import Path

from specserve.errors import ModelLoadError
from specserve.models.source import ModelSource


def load_tokenizer(source: ModelSource, cache_dir: Path | None):
    """A transformers tokenizer. A GGUF tokenizer is converted once and kept in ``cache_dir``."""
    from transformers import AutoTokenizer

    try:
        if source.kind == "hf":
            return AutoTokenizer.from_pretrained(str(source.path))
        if cache_dir is not None and (cache_dir / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cache_dir))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source.path}: {exc}") from None
    if cache_dir is not None:
        try:
            tokenizer.save_pretrained(str(cache_dir))
        except OSError:
            pass  # a read-only cache only costs the conversion next time
    return tokenizer
