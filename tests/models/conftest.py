"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer_files(smollm, tmp_path_factory):
    """A tokenizer to place beside tiny checkpoints (the loader wants one; ids stay < 128 here)."""
    folder = tmp_path_factory.mktemp("tok")
    smollm.tokenizer.save_pretrained(str(folder))
    return folder
