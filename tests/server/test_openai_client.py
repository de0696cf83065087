"""The server through the real ``openai`` client: completions and chat, whole and streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, SPECULATIVE

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion(client):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert response.object == "text_completion"
    assert response.model == MODEL_NAME
    [choice] = response.choices
    assert choice.finish_reason == "length" and choice.text.strip() != ""
    assert response.usage.completion_tokens == 8
    assert response.usage.prompt_tokens == 5  # "The capital of France is": no BOS for this tokenizer
    assert response.usage.total_tokens == 13


def test_streamed_completion_matches_and_reports_usage(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 12, 17)


def test_chat_whole_and_streamed_agree(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert "Paris" in whole.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_without_max_tokens_runs_to_the_end_of_the_answer(client):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0,
    )
    assert response.choices[0].finish_reason == "stop"  # EOS, long before the rest of the context
    assert "Paris" in response.choices[0].message.content


def test_n_choices_with_seed_are_reproducible(client):
    def ask():
        return client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=8, temperature=1.0, seed=1234, n=2,
        )

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # seeds 1234 and 1235
    assert first.usage.completion_tokens == 16  # two choices of 8 (this prompt does not stop early)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 20


def test_errors_come_back_as_openai_errors(server):
    wrong_key = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=9000)
    assert "9000" in info.value.body["message"] and "8192" in info.value.body["message"]


def test_greedy_chat_equals_generate_cli(client):
    """The server's greedy chat answer is the CLI's: same engine, same template, same tokens."""
    cli = subprocess.run(
        [sys.executable, "-m", "specserve", "generate", QUESTION, "--device", "cpu", "--json",
         "--max-tokens", "16", "--speculative-config", SPECULATIVE],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "SPECSERVE_DEBUG": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
    )
    assert response.choices[0].message.content == expected["text"]
    assert response.choices[0].finish_reason == expected["finish_reason"]
    assert response.usage.completion_tokens == expected["num_generated_tokens"]
    assert response.usage.prompt_tokens == expected["num_prompt_tokens"]
