"""OpenAI request bodies in, validated ``GenerationRequest``s out; errors in OpenAI's shape.

Every field a client can send is type- and range-checked here, before anything reaches the
engine thread, so a client's mistake is always a 4xx ``ApiError`` and never a 500. What only
the engine can judge (prompt length against the context and the KV pool) is checked there by
``LLMEngine.check_request`` and comes back as a ``RequestError`` (400).

Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from specserve.config import DRAFTER_NAMES, SamplingParams, SpeculationParams
from specserve.engine.prompts import chat_prompt_ids, raw_prompt_ids
from specserve.errors import RequestError

MAX_N = 128  # choices per request; n engine requests are started for one HTTP request
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024  # characters; the detokenizer scans every stop string each step
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, message, param=param, code="invalid_value" if param else None)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN/Infinity, bad UTF-8 and deep nesting are 400s."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "too deeply nested"
        raise ApiError.bad_request(f"the body is not valid JSON ({detail}): send one JSON object") from None
    if not isinstance(body, dict):
        raise ApiError.bad_request(f"the body must be a JSON object, not {_json_type(body)}")
    return body


# ---- field readers: each returns the default for a missing or null field ---------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError.bad_request(f"{param} holds an unpaired UTF-16 surrogate: send valid Unicode text", param) from None
    return value


def read_int(
    body: dict, name: str, default: int | None, minimum: int, maximum: int = INT64_MAX, where: str = ""
) -> int | None:
    """``where``: the enclosing object's name and a dot (``"speculation."``), for ``param``."""
    value, param = body.get(name), where + name
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError.bad_request(f"{param} must be an integer, not {_json_type(value)}", param)
    if not minimum <= value <= maximum:
        bound = f"at least {minimum}" if maximum == INT64_MAX else f"between {minimum} and {maximum}"
        raise ApiError.bad_request(f"{param} must be {bound}, not {value}", param)
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError.bad_request(f"{param} must be a number, not {_json_type(value)}", param)
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ApiError.bad_request(f"{param} must be a finite number", param)
    return number


def read_number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    return default if value is None else _number(value, name)


def read_bool(body: dict, name: str, default: bool = False, where: str = "") -> bool:
    value, param = body.get(name), where + name
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError.bad_request(f"{param} must be true or false, not {_json_type(value)}", param)
    return value


def read_logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object as sorted (id, bias) pairs; ranges are SamplingParams'."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError.bad_request(f"logit_bias must be an object of token ids to numbers, not {_json_type(value)}",
                                   "logit_bias")
    pairs = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise ApiError.bad_request(f"logit_bias keys must be token ids such as \"42\", not {key[:20]!r}",
                                       "logit_bias")
        token_id = int(key)
        if token_id in pairs:
            raise ApiError.bad_request(f"logit_bias names token {token_id} twice", "logit_bias")
        pairs[token_id] = _number(bias, "logit_bias")
    return tuple(sorted(pairs.items()))


SPECULATION_FIELDS = ("enabled", "max_tree_tokens", "max_depth", "drafters")


def read_speculation(body: dict) -> SpeculationParams | None:
    """The ``speculation`` object (our extension); unknown keys in it are refused, not ignored."""
    value = body.get("speculation")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError.bad_request(f"speculation must be an object, not {_json_type(value)}", "speculation")
    unknown = sorted(set(value) - set(SPECULATION_FIELDS))
    if unknown:
        param = f"speculation.{unknown[0]}"[:80]
        raise ApiError.bad_request(f"{param} is not a speculation field; use {', '.join(SPECULATION_FIELDS)}", param)
    drafters = value.get("drafters")
    if drafters is not None:
        if not isinstance(drafters, list) or any(d not in DRAFTER_NAMES for d in drafters):
            raise ApiError.bad_request(
                f"speculation.drafters must be an array of drafter names among {', '.join(DRAFTER_NAMES)}",
                "speculation.drafters",
            )
        drafters = tuple(dict.fromkeys(drafters))
    where = "speculation."
    return SpeculationParams(
        enabled=read_bool(value, "enabled", True, where),
        max_tree_tokens=read_int(value, "max_tree_tokens", None, 0, INT64_MAX, where),
        max_depth=read_int(value, "max_depth", None, 0, INT64_MAX, where),
        drafters=drafters,
    )


def read_model(body: dict) -> str | None:
    value = body.get("model")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError.bad_request(f"model must be a string, not {_json_type(value)}", "model")
    return _check_text(value, "model")


def read_stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
        raise ApiError.bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError.bad_request(f"stop may hold at most {MAX_STOP_STRINGS} strings, not {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise ApiError.bad_request("stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise ApiError.bad_request(f"stop strings may be at most {MAX_STOP_LENGTH} characters long", "stop")
    return tuple(_check_text(s, "stop") for s in stops)


def read_prompt(body: dict) -> str | list[int]:
    """A string, an array of token ids, or an array holding one string (or one id array)."""
    value = body.get("prompt")
    if value is None:
        raise ApiError.bad_request("prompt is required: send a string or an array of token ids", "prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if value == "":
            raise ApiError.bad_request("the prompt is empty: send at least one character of text", "prompt")
        return _check_text(value, "prompt")
    if isinstance(value, list):
        if not value:
            raise ApiError.bad_request("the prompt is empty: send at least one token id", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return list(value)
        if all(isinstance(t, str | list) for t in value):
            raise ApiError.bad_request("send one prompt per request (n asks for several completions)", "prompt")
    raise ApiError.bad_request("prompt must be a string or an array of integer token ids", "prompt")


def read_messages(body: dict) -> list[dict[str, str]]:
    """Chat messages as {"role", "content"} string pairs; text parts are joined."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError.bad_request("messages must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError.bad_request(f"{param} must be an object with role and content", param)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role == "":
            raise ApiError.bad_request(f"{param}.role must be a non-empty string", f"{param}.role")
        if content is None:
            content = ""
        elif isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise ApiError.bad_request(
                    f"{param}.content parts must be {{\"type\": \"text\", \"text\": ...}} objects", f"{param}.content"
                )
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise ApiError.bad_request(f"{param}.content must be a string or an array of text parts", f"{param}.content")
        messages.append({"role": _check_text(role, f"{param}.role"), "content": _check_text(content, f"{param}.content")})
    return messages


# ---- the validated request ---------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions call, validated.

    Exactly one of ``prompt`` (completions) and ``messages`` (chat) is set. When the client gave
    no max_tokens (chat only), ``params.max_tokens`` is a placeholder and ``max_tokens_given`` is
    False: the engine thread fills in the rest of the context once the prompt is tokenized.
    """

    kind: str  # "completion" or "chat"
    model: str | None
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    max_tokens_given: bool
    n: int
    stream: bool
    include_usage: bool
    return_spec_stats: bool
    speculation: SpeculationParams | None = None  # None: the server's defaults
    pace_tokens: bool = False  # stream: spread each step's tokens over the step's duration
    include_spec_stats: bool = False  # stream: every chunk says how many of its tokens were accepted drafts

    def prompt_token_ids(self, tokenizer) -> list[int]:
        """Tokenize (through the chat template for chat); call in the engine thread."""
        if self.messages is not None:
            return chat_prompt_ids(tokenizer, self.messages)
        if isinstance(self.prompt, str):
            return raw_prompt_ids(tokenizer, self.prompt)
        return list(self.prompt)

    def seed_of(self, index: int) -> int | None:
        """Choice ``index``'s seed: seed + index, so n seeded choices differ yet reproduce."""
        return None if self.params.seed is None else self.params.seed + index


def parse_generation_request(body: dict[str, Any], kind: str) -> GenerationRequest:
    """Validate a completions (``kind`` "completion") or chat (``kind`` "chat") body."""
    model = read_model(body)
    if kind == "chat":
        messages, prompt = read_messages(body), None
        max_tokens = read_int(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = read_int(body, "max_tokens", None, 1)
    else:
        messages, prompt = None, read_prompt(body)
        max_tokens = read_int(body, "max_tokens", 16, 1)
    top_k = read_int(body, "top_k", 0, -1, 2**31 - 1)
    n = read_int(body, "n", 1, 1, MAX_N)
    stream = read_bool(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = pace_tokens = include_spec_stats = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise ApiError.bad_request("stream_options must be an object", "stream_options")
        if not stream:
            raise ApiError.bad_request("stream_options is only allowed when stream is true", "stream_options")
        include_usage = read_bool(stream_options, "include_usage", where="stream_options.")
        pace_tokens = read_bool(stream_options, "pace_tokens", where="stream_options.")
        include_spec_stats = read_bool(stream_options, "include_spec_stats", where="stream_options.")
    speculation = read_speculation(body)
    try:
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 1,
            temperature=read_number(body, "temperature", 1.0),
            top_p=read_number(body, "top_p", 1.0),
            top_k=max(top_k, 0),  # vLLM's -1 means off, like our 0
            min_p=read_number(body, "min_p", 0.0),
            presence_penalty=read_number(body, "presence_penalty", 0.0),
            frequency_penalty=read_number(body, "frequency_penalty", 0.0),
            repetition_penalty=read_number(body, "repetition_penalty", 1.0),
            logit_bias=read_logit_bias(body),
            seed=read_int(body, "seed", None, INT64_MIN, INT64_MAX),
            stop=read_stop(body),
            ignore_eos=read_bool(body, "ignore_eos"),
        )
    except RequestError as exc:
        raise ApiError.bad_request(str(exc), exc.param) from None
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        messages=messages,
        params=params,
        max_tokens_given=max_tokens is not None,
        n=n,
        stream=stream,
        include_usage=include_usage,
        return_spec_stats=read_bool(body, "return_spec_stats"),
        speculation=speculation,
        pace_tokens=pace_tokens,
        include_spec_stats=include_spec_stats,
    )


@dataclass(frozen=True)
class TokenizeRequest:
    """A /tokenize call: exactly one of ``prompt`` and ``messages``."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    add_special_tokens: bool

    def token_ids(self, tokenizer) -> list[int]:
        if self.messages is not None:
            return chat_prompt_ids(tokenizer, self.messages)
        return tokenizer.encode(self.prompt, add_special_tokens=self.add_special_tokens)


def parse_tokenize_request(body: dict[str, Any]) -> TokenizeRequest:
    model = read_model(body)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError.bad_request("send exactly one of prompt (a string) and messages (an array)")
    if "messages" in body:
        return TokenizeRequest(model, None, read_messages(body), False)
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise ApiError.bad_request(f"prompt must be a string, not {_json_type(prompt)}", "prompt")
    return TokenizeRequest(model, _check_text(prompt, "prompt"), None, read_bool(body, "add_special_tokens", True))
