"""Client mistakes get 4xx errors in OpenAI's shape, never a 500; a fuzz test of both POST routes."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY, MODEL_NAME

ROUTES = ("/v1/completions", "/v1/chat/completions")


def post(server, path: str, body: bytes | dict | list, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) over a fresh connection."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {API_KEY}", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def get(server, path: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_openai_error(status: int, body: dict, expected_status: int | None = None) -> dict:
    assert 400 <= status < 500, (status, body)
    if expected_status is not None:
        assert status == expected_status, (status, body)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    return error


def test_api_key_is_required_except_on_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, body = get(server, "/v1/models", headers)
        assert assert_openai_error(status, body, 401)["code"] == "invalid_api_key"
        status, _, body = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1},
                               {"Authorization": headers.get("Authorization", "")})
        assert_openai_error(status, body, 401)
    assert get(server, "/health")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 200
    conn.close()


def test_unknown_model_route_and_method(server):
    status, _, body = post(server, "/v1/completions", {"model": "gpt-4o", "prompt": "Hi", "max_tokens": 1})
    error = assert_openai_error(status, body, 404)
    assert error["code"] == "model_not_found" and MODEL_NAME in error["message"]
    status, body = get(server, "/v1/nothing-here", {"Authorization": f"Bearer {API_KEY}"})
    assert_openai_error(status, body, 404)
    status, body = get(server, "/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"})
    assert_openai_error(status, body, 405)


def test_prompt_over_the_context_names_both_numbers(server):
    long_prompt = "hello " * 8200
    status, _, body = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 10})
    error = assert_openai_error(status, body, 400)
    num_prompt = int(error["message"].split("the prompt has ")[1].split(" ")[0])
    assert num_prompt > 8192 and "8192" in error["message"] and error["param"] == "prompt"
    status, _, body = post(server, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 8190})
    error = assert_openai_error(status, body, 400)
    assert "8190" in error["message"] and "8192" in error["message"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "temperature": -0.1}, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": "8"}, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ],
)
def test_invalid_fields_name_their_param(server, route, body, param):
    status, _, answer = post(server, route, body)
    assert assert_openai_error(status, answer, 400)["param"] == param


# ---- fuzz -------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
not_int = json_values.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int)))
not_number = json_values.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int | float)))
not_bool = json_values.filter(lambda v: v is not None and not isinstance(v, bool))
not_str = json_values.filter(lambda v: v is not None and not isinstance(v, str))

# field -> values that make any body invalid, whatever the other fields hold
INVALID = {
    "model": not_str | st.text(min_size=1, max_size=10).filter(lambda s: s != MODEL_NAME),
    "max_tokens": not_int | st.integers(max_value=0) | st.integers(min_value=9000, max_value=10**30),
    "temperature": not_number | st.floats(max_value=-1e-9, allow_infinity=False) | st.integers(max_value=-1),
    "top_p": not_number | st.floats(max_value=0.0, allow_infinity=False) | st.floats(min_value=1.0001, allow_infinity=False),
    "top_k": not_int | st.integers(max_value=-2),
    "n": not_int | st.integers(max_value=0) | st.integers(min_value=129),
    "seed": not_int | st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1),
    "stop": json_values.filter(lambda v: v is not None and not isinstance(v, str) and not (isinstance(v, list) and all(isinstance(s, str) and s for s in v) and len(v) <= 16)),
    "stream": not_bool,
    "stream_options": not_bool.filter(lambda v: not isinstance(v, dict)),
    "ignore_eos": not_bool,
    "return_spec_stats": not_bool,
    "min_p": not_number | st.floats(max_value=-1e-9, allow_infinity=False) | st.floats(min_value=1.0001, allow_infinity=False),
    "presence_penalty": not_number | st.floats(min_value=2.0001, allow_infinity=False) | st.floats(max_value=-2.0001, allow_infinity=False),
    "frequency_penalty": not_number | st.floats(min_value=2.0001, allow_infinity=False),
    "repetition_penalty": not_number | st.floats(max_value=0.0, allow_infinity=False) | st.floats(min_value=10.0001, allow_infinity=False),
    "logit_bias": json_values.filter(lambda v: v is not None and not isinstance(v, dict))
    | st.dictionaries(st.sampled_from(["1", "2"]), st.floats(min_value=100.001, allow_infinity=False), min_size=1)
    | st.dictionaries(st.text(max_size=4).filter(lambda k: not (k.isascii() and k.isdigit())), st.just(1), min_size=1),
    "speculation": json_values.filter(lambda v: v is not None and not isinstance(v, dict))
    | st.fixed_dictionaries({"max_tree_tokens": st.integers(max_value=-1)})
    | st.fixed_dictionaries({"max_depth": not_int})
    | st.fixed_dictionaries({"enabled": not_bool})
    | st.fixed_dictionaries({"drafters": st.lists(st.text(max_size=5), min_size=1).filter(
        lambda v: any(d not in ("ngram", "early_exit", "draft") for d in v))}),
}
INVALID_PROMPT = not_str.filter(lambda v: not (isinstance(v, list) and v and (
    all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 49152 for t in v)
    or (len(v) == 1 and isinstance(v[0], str) and v[0]) or (len(v) == 1 and isinstance(v[0], list))))) | st.just("")
INVALID_MESSAGES = json_values.filter(lambda v: not (isinstance(v, list) and v and all(
    isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
    and isinstance(m.get("content", ""), str | list | None)  # text-part lists may be valid: not generated
    for m in v)))
VALID_EXTRAS = {"temperature": st.just(0.5), "stream": st.booleans(), "seed": st.integers(0, 10),
                "stop": st.just(["\n"]), "user": json_values, "logprobs": json_values, "frobnicate": json_values}


@st.composite
def invalid_requests(draw, route: str) -> tuple[bytes, str]:
    """(body bytes, content type) that the server must refuse with a 4xx."""
    kind = draw(st.sampled_from(["field", "field", "field", "prompt", "bytes", "not_object", "content_type"]))
    base: dict = ({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in route else {"prompt": "Hi"})
    base["max_tokens"] = 1
    for name, strategy in VALID_EXTRAS.items():
        if draw(st.booleans()):
            base[name] = draw(strategy)
    if kind == "field":
        name = draw(st.sampled_from(sorted(INVALID)))
        base[name] = draw(INVALID[name])
        if name == "stream_options" or (name != "stream" and draw(st.booleans())):
            base.pop("stream", None)  # stream_options without stream is invalid too
        return json.dumps(base).encode(), "application/json"
    if kind == "prompt":
        if "chat" in route:
            base["messages"] = draw(INVALID_MESSAGES)
        else:
            base["prompt"] = draw(INVALID_PROMPT)
        return json.dumps(base).encode(), "application/json"
    if kind == "bytes":
        raw = draw(st.binary(max_size=40) | st.just(json.dumps(base).encode()[:-1]) | st.just(b"{'prompt': 'Hi'}"))
        try:
            if isinstance(json.loads(raw), dict):
                raw = b"{" + raw  # make sure it is not a JSON object
        except ValueError:
            pass
        return raw, "application/json"
    if kind == "not_object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode(), "application/json"
    content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "",
                                         "application/xml"]))
    return json.dumps(base).encode(), content_type


@pytest.mark.parametrize("route", ROUTES)
def test_fuzzed_invalid_bodies_get_4xx_openai_errors(server, route):
    counts = {"requests": 0}

    @settings(max_examples=500, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.filter_too_much])
    @given(invalid_requests(route))
    def check(request):
        raw, content_type = request
        status, _, body = post(server, route, raw, {"Content-Type": content_type})
        counts["requests"] += 1
        assert_openai_error(status, body)

    check()
    assert counts["requests"] >= 500
    status, _, body = post(server, route, {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                                           "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2
    log = server.log(tail=10**8)
    assert "Traceback" not in log and '" 500 ' not in log
