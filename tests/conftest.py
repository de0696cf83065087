"""Shared fixtures. Tests run on the CPU; kernels through Triton's interpreter there."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from specserve.config import ModelConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm():
    """The default model (SmolLM2-135M-Instruct from its GGUF), float32 on the CPU, loaded once."""
    from specserve.models.loader import load_model

    return load_model(ModelConfig(dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def smollm_gguf_path():
    from specserve.models.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_files(smollm, tmp_path_factory):
    """A tokenizer to place beside tiny checkpoints (the loader wants one; ids stay < 128 there)."""
    folder = tmp_path_factory.mktemp("tok")
    smollm.tokenizer.save_pretrained(str(folder))
    return folder
