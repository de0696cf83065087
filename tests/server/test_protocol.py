"""Parsing the new request fields (no server): the speculation object, sampling controls, stream options."""

from __future__ import annotations

import pytest

from specserve.config import SpeculationParams
from specserve.server.protocol import ApiError, parse_generation_request


def parse(**fields):
    return parse_generation_request({"prompt": "Hi", **fields}, "completion")


def test_speculation_is_optional_and_parsed_exactly():
    assert parse().speculation is None
    request = parse(speculation={"enabled": True, "max_tree_tokens": 3, "max_depth": 2,
                                 "drafters": ["ngram", "draft", "ngram"]})
    assert request.speculation == SpeculationParams(True, 3, 2, ("ngram", "draft"))
    assert parse(speculation={}).speculation == SpeculationParams()
    assert parse(speculation={"enabled": False}).speculation == SpeculationParams(enabled=False)
    chat = parse_generation_request({"messages": [{"role": "user", "content": "Hi"}],
                                     "speculation": {"max_depth": 0}}, "chat")
    assert chat.speculation == SpeculationParams(max_depth=0)


def test_sampling_controls_reach_the_params():
    params = parse(min_p=0.1, presence_penalty=-0.5, frequency_penalty=1, repetition_penalty=1.2,
                   logit_bias={"42": -100, "7": 2.5}).params
    assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.1, -0.5, 1.0, 1.2)
    assert params.logit_bias == ((7, 2.5), (42, -100.0))


def test_stream_options_pace_and_spec_stats():
    request = parse(stream=True, stream_options={"pace_tokens": True, "include_spec_stats": True})
    assert request.pace_tokens and request.include_spec_stats and not request.include_usage
    assert not parse(stream=True).pace_tokens


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"speculation": 3}, "speculation"),
        ({"speculation": []}, "speculation"),
        ({"speculation": {"enabled": "yes"}}, "speculation.enabled"),
        ({"speculation": {"max_tree_tokens": -1}}, "speculation.max_tree_tokens"),
        ({"speculation": {"max_tree_tokens": 2.5}}, "speculation.max_tree_tokens"),
        ({"speculation": {"max_depth": "4"}}, "speculation.max_depth"),
        ({"speculation": {"drafters": "ngram"}}, "speculation.drafters"),
        ({"speculation": {"drafters": ["magic"]}}, "speculation.drafters"),
        ({"speculation": {"max_tree_token": 3}}, "speculation.max_tree_token"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": "0.1"}, "min_p"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
        ({"stream": True, "stream_options": {"pace_tokens": 1}}, "stream_options.pace_tokens"),
        ({"stream": True, "stream_options": {"include_spec_stats": "no"}}, "stream_options.include_spec_stats"),
    ],
)
def test_invalid_values_name_the_field(fields, param):
    with pytest.raises(ApiError) as info:
        parse(**fields)
    assert info.value.status == 400 and info.value.param == param
