"""What a training run records beside its figures: device, versions, commit (specserve.environment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specserve.environment import environment, git_state  # noqa: F401  (re-exported)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
