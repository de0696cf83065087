"""Hugging Face checkpoint folders: config.json plus one or more *.safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from specserve.errors import ModelLoadError
from specserve.models.config import LlamaArchConfig


def read_hf_config(folder: Path) -> LlamaArchConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}") from None
    try:
        return LlamaArchConfig.from_hf_dict(raw)
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks the field {exc.args[0]!r}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json if present, else every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {index}: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    return sorted(folder.glob("*.safetensors"))


def read_hf(folder: Path) -> tuple[LlamaArchConfig, Iterator[tuple[str, torch.Tensor]], int]:
    """Arch config, a lazy iterator over (transformers name, tensor), and the tensor count."""
    from safetensors import safe_open

    cfg = read_hf_config(folder)
    handles = []
    for file in safetensors_files(folder):
        try:
            handles.append(safe_open(str(file), framework="pt"))
        except Exception as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {exc}") from None
    count = sum(len(list(h.keys())) for h in handles)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for handle in handles:
            for name in handle.keys():
                yield name, handle.get_tensor(name)

    return cfg, tensors(), count
