"""kernels/ imports as ``specserve_kernels`` and never as ``kernels``, Hugging Face's package that
transformers 5.25+ imports: the folder is no regular package, so not even from the repo root."""

import importlib.util
import tomllib
from pathlib import Path

from specserve_kernels import reference

REPO = Path(__file__).resolve().parents[2]


def test_the_kernels_import_as_specserve_kernels():
    assert Path(reference.__file__).resolve() == REPO / "kernels" / "reference.py"


def test_the_name_kernels_is_never_our_folder():
    spec = importlib.util.find_spec("kernels")  # None, HF's package, or a namespace (origin None)
    assert spec is None or spec.origin is None or Path(spec.origin).resolve().parent != REPO / "kernels"


def test_an_install_gets_every_package():
    """pyproject.toml lists the packages (find cannot rename kernels/), so none may be missing."""
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(init.parent.relative_to(REPO).parts)
             for top in ("specserve", "draft_models", "bench") for init in (REPO / top).rglob("__init__.py")}
    assert found <= set(listed)
