"""What every benchmark records beside its figures: device, versions, commit, config."""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def environment() -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=5,
        )
        commit = done.stdout.strip() if done.returncode == 0 else None  # None: not a git checkout
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "num_cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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


def summarise(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99, min, max of a list of numbers (nearest-rank percentiles)."""
    ordered = sorted(values)

    def rank(q: float) -> float:  # the smallest value with at least q of the values <= it
        return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]

    return {
        "mean": statistics.fmean(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def save_json(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
