"""The Triton kernels in kernels/, each beside a plain PyTorch reference of the same signature.

Their import name is ``specserve_kernels``: ``kernels`` is Hugging Face's package, which
transformers (5.25 and newer) imports. An install maps the name to the folder (pyproject.toml's
``package-dir``); run from the source tree (the repo root on sys.path), this module does, by
giving the name the folder as its ``__path__``. kernels/ has no ``__init__.py``, so that there it
never shadows Hugging Face's ``kernels``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().with_name("kernels"))]
