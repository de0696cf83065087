"""load_tokenizer's errors: one sentence with the file, and a hint for a known environment clash."""

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


def test_the_kernels_name_clash_names_its_fix(monkeypatch):
    clash = ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raising(clash))
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(SOURCE, None)
    assert str(info.value) == (
        "cannot load the tokenizer of /models/some-llama: cannot import name 'CUDAProperties' from 'kernels' "
        "(/repo/kernels/__init__.py) (transformers 5.25 or newer clashes with specserve's own `kernels` package: "
        "install transformers<5.25, as pyproject.toml pins)")


def test_other_failures_get_no_hint(monkeypatch):
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raising(OSError("no tokenizer.json")))
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(SOURCE, None)
    assert str(info.value) == "cannot load the tokenizer of /models/some-llama: no tokenizer.json"
