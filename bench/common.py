"""What every benchmark records beside its figures: device, versions, commit, config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from specserve.environment import environment  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file with a ``prompt`` field per line."""
    prompts = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "prompt" not in record:
                raise ValueError(f"{path}:{line_number} has no 'prompt' field")
            prompts.append(record["prompt"])
    return prompts[:limit]


def save_json(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Writes ``payload`` whole or not at all: a temporary file beside ``out``, then a rename, so a
    run killed while saving (runs save after every step) keeps the previous complete file."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
