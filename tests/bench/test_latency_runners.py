"""The runners of bench.latency: our engine step by step, transformers generate with a timing
streamer, the hf-assisted draft model, and --methods resolution."""

from __future__ import annotations

import pytest
import torch

from bench.latency import resolve_methods
from bench.latency_runners import (
    EngineRunner,
    GenerationSettings,
    HFRunner,
    TimingStreamer,
    assistant_from_first_layers,
    transformers_twin,
)
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine

EOS = 1


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=EOS, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_timing_streamer_skips_the_prompt_and_counts_tokens_per_sequence():
    streamer = TimingStreamer()
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt
    streamer.put(torch.tensor([8]))  # one token per sequence (plain decoding)
    streamer.put(torch.tensor([[9, 10, 11]]))  # three tokens of one verification step
    assert streamer.counts == [1, 3] and len(streamer.times) == 2 and streamer.times[0] <= streamer.times[1]


def test_assistant_keeps_the_first_layers(tiny_llama):
    draft = assistant_from_first_layers(tiny_llama, 2)
    assert len(draft.model.layers) == 2 and draft.config.num_hidden_layers == 2
    assert len(tiny_llama.model.layers) == 4 and tiny_llama.config.num_hidden_layers == 4
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, tiny_llama.model.layers[1].mlp.up_proj.weight)
    for bad in (0, 4):
        with pytest.raises(ValueError):
            assistant_from_first_layers(tiny_llama, bad)


@pytest.mark.parametrize("mode", ["hf", "hf-lookup", "hf-assisted"])
def test_hf_runner_times_every_token(tiny_llama, mode):
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # repetitive: prompt lookup finds drafts
    kwargs = {"hf": {}, "hf-lookup": {"prompt_lookup_num_tokens": 3},
              "hf-assisted": {"assistant_model": assistant_from_first_layers(tiny_llama, 2)}}[mode]
    if mode == "hf-assisted":
        kwargs["assistant_model"].generation_config.num_assistant_tokens = 3
    runner = HFRunner(tiny_llama, GenerationSettings(max_tokens=12, temperature=0.0, ignore_eos=True), (EOS,), 0, kwargs)
    result = runner.run_group([prompt], [0])
    (record,) = result.requests
    assert record.token_ids == greedy(tiny_llama, prompt, 12)  # greedy assisted decoding is exact
    assert record.timeline.total_tokens == 12 and record.timeline.ttft() > 0
    assert result.wall_s == record.timeline.e2e()
    assert record.acceptance.num_steps == len(record.timeline.times)
    assert 1 + record.acceptance.num_accepted_tokens / record.acceptance.num_steps == record.acceptance.mean_accepted_length
    if mode == "hf":
        assert set(record.timeline.num_tokens) == {1}


def test_hf_runner_left_pads_a_batch(tiny_llama):
    runner = HFRunner(tiny_llama, GenerationSettings(max_tokens=5, temperature=0.0, ignore_eos=True), (EOS,), 0)
    result = runner.run_group([[3, 4, 5, 6, 7], [8, 9]], [0, 1])
    assert [len(r.token_ids) for r in result.requests] == [5, 5]
    assert result.requests[0].timeline.times == result.requests[1].timeline.times  # one step for both
    assert result.requests[0].token_ids == greedy(tiny_llama, [3, 4, 5, 6, 7], 5)


class ScriptedModel:
    """Stands in for a transformers model: streams and returns fixed tokens."""

    device = torch.device("cpu")

    def __init__(self, steps: list[list[int]]) -> None:
        self.steps = steps  # per step, one token per batch row

    def generate(self, input_ids, streamer, **kwargs):
        streamer.put(input_ids)
        for step in self.steps:
            streamer.put(torch.tensor(step))
        return torch.cat([input_ids, torch.tensor(self.steps).T], dim=1)


def test_hf_runner_stops_each_row_at_its_eos():
    model = ScriptedModel([[7, 7], [EOS, 8], [0, 9], [0, EOS]])  # row 0 ends at step 2, row 1 at step 4
    runner = HFRunner(model, GenerationSettings(max_tokens=4, temperature=0.0, ignore_eos=False), (EOS,), 0)
    first, second = runner.run_group([[3, 4], [5, 6]], [0, 0]).requests
    assert (first.token_ids, first.finish_reason, len(first.timeline.times)) == ([7, EOS], "stop", 2)
    assert (second.token_ids, second.finish_reason, len(second.timeline.times)) == ([7, 8, 9, EOS], "stop", 4)


def test_engine_runner_batch_of_two(smollm):
    engine = LLMEngine(EngineConfig(model=ModelConfig(dtype="float32", device="cpu"),
                                    cache=CacheConfig(num_blocks=64), speculative=SpeculativeConfig(method="ngram")),
                       loaded=smollm)
    runner = EngineRunner(engine, GenerationSettings(max_tokens=6, temperature=0.0, ignore_eos=True))
    prompts = [engine.tokenize("one two three one two three one two"), engine.tokenize("def add(a, b):")]
    result = runner.run_group(prompts, [0, 1])
    for record in result.requests:
        assert len(record.token_ids) == 6 and record.timeline.total_tokens == 6
        assert record.timeline.num_tokens[0] == 1  # the prefill step samples one token
        assert record.acceptance.num_steps == len(record.timeline.times) - 1  # every later observation is a step
    assert not result.steps[0].decode_only and all(s.decode_only for s in result.steps[1:])
    assert all(s.verify_s > 0 and s.draft_s >= 0 and s.total_s >= s.verify_s for s in result.steps)
    assert result.wall_s == max(r.timeline.e2e() for r in result.requests)


def test_resolve_methods():
    methods = resolve_methods(["off", "ngram", "wide", "hf", "hf-lookup"], ['wide={"method": "ngram", "max_tree_tokens": 32}'])
    assert [(m.name, m.kind) for m in methods] == [("off", "engine"), ("ngram", "engine"), ("wide", "engine"),
                                                   ("hf", "hf"), ("hf-lookup", "hf-lookup")]
    assert methods[0].speculative.method == "off"
    assert (methods[2].speculative.method, methods[2].speculative.max_tree_tokens) == ("ngram", 32)
    for names, specs in ((["off", "nonsense"], []), (["off", "off"], []), (["off"], ["x=ngram"]),
                         (["hf"], ["hf=ngram"]), (["x"], ["x="]), (["ngram", "hf"], [])):  # the last lacks off
        with pytest.raises(ValueError):
            resolve_methods(names, specs)


def test_transformers_twin_holds_our_tensors(smollm):
    a = smollm.arch
    twin = transformers_twin(smollm)
    ours = dict(smollm.model.named_parameters())
    attention, mlp = twin.model.layers[1].self_attn, twin.model.layers[1].mlp
    qkv, gate_up = ours["layers.1.self_attn.qkv_proj.weight"], ours["layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(attention.q_proj.weight, qkv[: a.q_size])
    assert torch.equal(attention.k_proj.weight, qkv[a.q_size : a.q_size + a.kv_size])
    assert torch.equal(attention.v_proj.weight, qkv[a.q_size + a.kv_size :])
    assert torch.equal(mlp.gate_proj.weight, gate_up[: a.intermediate_size])
    assert torch.equal(mlp.up_proj.weight, gate_up[a.intermediate_size :])
    assert torch.equal(twin.model.norm.weight, ours["norm.weight"])
    assert a.tie_word_embeddings and twin.lm_head.weight is twin.model.embed_tokens.weight
    inv_freq = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim)
    assert torch.allclose(twin.model.rotary_emb.inv_freq, inv_freq)  # not the garbage of a meta build
    engine = LLMEngine(EngineConfig(model=ModelConfig(dtype="float32", device="cpu"), cache=CacheConfig(num_blocks=16)),
                       loaded=smollm)
    prompt = engine.tokenize("def add(a, b):")
    ours_ids = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids
    assert greedy(twin, prompt, 4) == ours_ids
