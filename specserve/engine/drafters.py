"""Build the drafter a SpeculativeConfig names."""

from __future__ import annotations

from draft_models.base import Drafter
from specserve.config import SpeculativeConfig
from specserve.errors import SpecserveError
from specserve.models.loader import LoadedModel


def make_drafter(cfg: SpeculativeConfig, loaded: LoadedModel) -> Drafter | None:
    if cfg.method == "off":
        return None
    if cfg.method == "ngram":
        from draft_models.ngram import NgramDrafter

        return NgramDrafter(cfg.ngram_max, cfg.ngram_min, max_paths=max(cfg.widths))
    raise SpecserveError(f"speculative method {cfg.method!r} is not available yet")
