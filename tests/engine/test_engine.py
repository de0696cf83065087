import pytest

from specserve.config import SamplingParams
from specserve.errors import RequestError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone_outputs(make_engine, chat_ids):
    """Greedy outputs of the first 8 prompts, each generated on its own (the reference)."""
    engine = make_engine()
    return [engine.generate([ids], GREEDY)[0].token_ids for ids in chat_ids[:8]]


def test_batch_of_eight_equals_each_alone(make_engine, chat_ids, alone_outputs):
    engine = make_engine()
    outputs = engine.generate(chat_ids[:8], GREEDY)
    assert len({len(ids) for ids in chat_ids[:8]}) > 4  # prompts of different lengths
    assert [o.token_ids for o in outputs] == alone_outputs
    assert all(o.num_generated_tokens == 24 and o.finish_reason == "length" for o in outputs)
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_chunked_prefill_equals_whole_prefill(make_engine, chat_ids, alone_outputs):
    engine = make_engine(chunk=7)
    outputs = engine.generate(chat_ids[:8], GREEDY)
    assert [o.token_ids for o in outputs] == alone_outputs


def test_preemption_under_a_tiny_pool_keeps_outputs(make_engine, chat_ids, alone_outputs):
    engine = make_engine(num_blocks=12, block_size=16)
    outputs = engine.generate(chat_ids[:8], GREEDY)
    assert [o.token_ids for o in outputs] == alone_outputs
    assert engine.kv_manager.pool.num_free_blocks == 12


def test_prefix_cache_hits_and_same_output(make_engine, chat_ids, alone_outputs):
    engine = make_engine()
    first = engine.generate([chat_ids[0]], GREEDY)[0]
    hits_before = engine.kv_manager.pool.num_prefix_hits
    second = engine.generate([chat_ids[0]], GREEDY)[0]
    full_blocks = len(chat_ids[0]) // 16
    assert engine.kv_manager.pool.num_prefix_hits - hits_before == full_blocks
    assert first.token_ids == second.token_ids == alone_outputs[0]


def test_seeded_sampling_is_reproducible(make_engine, chat_ids):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = make_engine().generate(chat_ids[:3], params)
    b = make_engine().generate(chat_ids[:3][::-1], params)[::-1]  # other batch order, other engine
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    other_seed = SamplingParams(**{**params.__dict__, "seed": 4321})
    c = make_engine().generate(chat_ids[:3], other_seed)
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_greedy_answer_and_eos(make_engine, chat_ids):
    out = make_engine().generate([chat_ids[0]], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|> is the EOS
    assert "<|im_end|>" not in out.text


def test_stop_string_cuts_text(make_engine, chat_ids):
    out = make_engine().generate([chat_ids[0]], SamplingParams(max_tokens=64, temperature=0.0, stop=("France",)))[0]
    assert out.finish_reason == "stop"
    assert out.text == "The capital of "


def test_stop_token_id(make_engine, chat_ids):
    engine = make_engine()
    ref = engine.generate([chat_ids[0]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    stop_at = ref.token_ids[2]
    out = engine.generate([chat_ids[0]], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == ref.token_ids[:3] and out.finish_reason == "stop"


def test_abort_frees_blocks(make_engine, chat_ids):
    engine = make_engine()
    request_id = engine.add_request(chat_ids[1], GREEDY)
    engine.step()
    engine.step()
    assert engine.kv_manager.pool.num_free_blocks < engine.kv_manager.pool.num_blocks
    out = engine.abort(request_id)
    assert out.finished and out.finish_reason == "abort"
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.pool.num_blocks
    assert not engine.has_unfinished()
    assert engine.abort(request_id) is None


def test_request_errors_are_one_sentence(make_engine):
    engine = make_engine(num_blocks=4, block_size=16)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(RequestError, match=r"8190 tokens and max_tokens is 24: 8214 tokens exceed the model's context of 8192"):
        engine.add_request([5] * 8190, GREEDY)
    with pytest.raises(RequestError, match="more KV cache than the pool holds \\(64 tokens\\)"):
        engine.add_request([5] * 50, GREEDY)
    with pytest.raises(RequestError, match=r"token ids must be integers in \[0, 49152\)"):
        engine.add_request([5, 49152], GREEDY)
    with pytest.raises(RequestError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not engine.has_unfinished()
