"""load_tokenizer's errors: one sentence with the file."""

from pathlib import Path

import pytest
import transformers

from specserve.errors import ModelLoadError
from specserve.models.source import ModelSource
from specserve.models.tokenizer import load_tokenizer

SOURCE = ModelSource("hf", Path("/models/some-llama"))


def raising(exc):
    def from_pretrained(*args, **kwargs):
        raise exc
    return from_pretrained


def test_a_failure_names_the_model_and_the_cause(monkeypatch):
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raising(OSError("no tokenizer.json")))
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(SOURCE, None)
    assert str(info.value) == "cannot load the tokenizer of /models/some-llama: no tokenizer.json"
