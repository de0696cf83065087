"""What every recorded result carries beside its figures: device, versions, git state."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO_DIR = Path(__file__).resolve().parents[1]


def git_state(repo: Path = REPO_DIR) -> dict[str, Any]:
    """HEAD's commit and whether the tree has uncommitted changes (None: not a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                              cwd=repo, timeout=5)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=repo, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}
    if head.returncode != 0:
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def environment() -> dict[str, Any]:
    """Device, thread count and library versions of this process, the git state and the time."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    git = git_state()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "num_cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "git_commit": git["commit"],
        "git_uncommitted_changes": git["uncommitted_changes"],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
