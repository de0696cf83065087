"""The offload path (layers in a host store, copied per layer into working buffers) gives the
resident path's outputs exactly, on the CPU."""

import time

import pytest
import torch

from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.model_runner import prompt_logits
from specserve.errors import SpecserveError
from specserve.models.config import LlamaArchConfig
from specserve.models.loader import load_model
from specserve.offload.offloaded_model import OffloadedLlamaForCausalLM
from specserve.offload.planner import PREFETCH_BYTES, layer_numel, plan_residency

PROMPT = [1, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 1, 4093]


@pytest.fixture(scope="module")
def offloaded():
    """SmolLM2 with 10 of its 30 layers resident (a 0.1 GB budget in float32), the rest streamed."""
    return load_model(ModelConfig(device="cpu", dtype="float32", offload=True, gpu_memory_budget_gb=0.25))


def test_plan_and_structure(offloaded):
    plan = offloaded.residency
    assert isinstance(offloaded.model, OffloadedLlamaForCausalLM)
    assert plan.num_resident + plan.num_offloaded == 30 and 0 < plan.num_resident < 30
    assert len(offloaded.model.layers) == plan.num_resident
    assert offloaded.model.streamer.num_offloaded == plan.num_offloaded
    assert offloaded.model.streamer.streamed_bytes == plan.host_bytes == plan.num_offloaded * plan.layer_bytes


def test_offloaded_logits_equal_resident(smollm, offloaded):
    torch.testing.assert_close(prompt_logits(offloaded.model, PROMPT), prompt_logits(smollm.model, PROMPT),
                               rtol=0, atol=0)


def test_fully_offloaded_generation_equals_resident_with_speculation(smollm):
    streamed = load_model(ModelConfig(device="cpu", dtype="float32", offload=True))
    assert streamed.residency.num_resident == 0
    spec = SpeculativeConfig(method="ngram", max_tree_tokens=8)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:5] * 3]
    ours = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=spec), loaded=streamed).generate(prompts, params)
    ref = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=smollm).generate(prompts, params)
    assert [o.token_ids for o in ours] == [o.token_ids for o in ref]


def test_three_working_buffers_give_the_resident_logits(smollm):
    """Layers rotate through 3 working buffers (layer k in buffer k % 3): same logits exactly."""
    streamed = load_model(ModelConfig(device="cpu", dtype="float32", offload=True, offload_buffers=3))
    assert streamed.model.streamer.num_buffers == 3 and streamed.residency.num_resident == 0
    torch.testing.assert_close(prompt_logits(streamed.model, PROMPT), prompt_logits(smollm.model, PROMPT),
                               rtol=0, atol=0)


def test_prefetched_layers_are_in_place_between_passes_and_outputs_stay_exact(smollm):
    """With 4 buffers the first 3 layers of a pass are copied by the pass before (prefetch across
    passes): between passes buffers 0..2 hold layers 0..2, and generation through an early-exit
    drafter (2-layer forwards of the same streamed layers) mixed with full passes gives the
    resident engine's tokens exactly."""
    streamed = load_model(ModelConfig(device="cpu", dtype="float32", offload=True, offload_buffers=4))
    streamer = streamed.model.streamer
    assert streamer.num_prefetched == 3 and streamed.residency.num_resident == 0
    torch.testing.assert_close(prompt_logits(streamed.model, PROMPT), prompt_logits(smollm.model, PROMPT),
                               rtol=0, atol=0)
    for index in range(3):  # layer 27 went through buffer 27 % 4 = 3, layers 28, 29 through 0, 1: prefetched over
        assert torch.equal(streamer.buffers[index], streamer.host_flats[index])
    spec = SpeculativeConfig(method="early_exit", num_layers=2, max_tree_tokens=6, max_depth=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:5] * 3]
    ours = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=spec), loaded=streamed).generate(prompts, params)
    ref = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=smollm).generate(prompts, params)
    assert [o.token_ids for o in ours] == [o.token_ids for o in ref]
    assert all(torch.equal(streamer.buffers[i], streamer.host_flats[i]) for i in range(3))


def test_planner_arithmetic_and_errors():
    arch = LlamaArchConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=4, num_heads=2,
                           num_kv_heads=1, head_dim=4, max_position_embeddings=64, tie_word_embeddings=True)
    # q 8x8, k and v 8x4 each, o 8x8, mlp 3x8x16, two norms of 8
    assert layer_numel(arch) == 8 * 16 + 8 * 8 + 3 * 8 * 16 + 16 == 592
    layer_bytes = 592 * 4
    fixed = (100 * 8 + 8) * 4 + 2 * layer_bytes
    plan = plan_residency(arch, torch.float32, (fixed + 3 * layer_bytes + 1) / 1e9)
    assert (plan.num_resident, plan.num_offloaded, plan.host_bytes) == (3, 1, layer_bytes)
    assert plan_residency(arch, torch.float32, None).num_resident == 0
    with pytest.raises(SpecserveError, match="too small"):
        plan_residency(arch, torch.float32, 1e-9)
    # a third working buffer is counted against the budget: one layer fewer resident
    assert plan_residency(arch, torch.float32, (fixed + 3 * layer_bytes + 1) / 1e9, 3).num_resident == 2
    assert plan.num_buffers == 2  # left to the planner under a budget: resident layers first


def test_planner_buffer_count_prefetches_about_56_mb_when_every_layer_streams():
    """Fully offloaded, the planner's buffers prefetch ceil(PREFETCH_BYTES / layer) layers (fewer
    than all); under a budget it takes 2, and an explicit count is kept."""
    smollm2 = LlamaArchConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                              num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
    assert layer_numel(smollm2) * 2 == 7_080_192  # bf16 bytes of a layer: 56 MB is 7.9 layers
    assert PREFETCH_BYTES == 56 * 10**6
    assert plan_residency(smollm2, torch.bfloat16, None).num_buffers == 9  # as measured best on the H200
    assert plan_residency(smollm2, torch.float32, None).num_buffers == 5  # 14.2 MB layers: 4 prefetched
    assert plan_residency(smollm2, torch.bfloat16, 1.0).num_buffers == 2
    assert plan_residency(smollm2, torch.bfloat16, None, 3).num_buffers == 3
    tiny = LlamaArchConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=4, num_heads=2,
                           num_kv_heads=1, head_dim=4, max_position_embeddings=64)
    assert plan_residency(tiny, torch.float32, None).num_buffers == 4  # 3 of 4 layers prefetched, not all
    one = LlamaArchConfig(**{**tiny.__dict__, "num_layers": 1})
    assert plan_residency(one, torch.float32, None).num_buffers == 2
    with pytest.raises(SpecserveError, match="needs --offload"):
        ModelConfig(gpu_memory_budget_gb=4.0)
    with pytest.raises(SpecserveError, match="--offload-buffers needs --offload"):
        ModelConfig(offload_buffers=3)
    with pytest.raises(SpecserveError, match="at least 2"):
        ModelConfig(offload=True, offload_buffers=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_offloaded_graphs_equal_eager_and_resident():
    """On CUDA, fp32: the fully offloaded model's streamed forward captured in CUDA graphs (its
    layer copies are graph nodes) gives the resident eager engine's greedy tokens, with and
    without speculation, with 2 and 5 working buffers."""
    resident = load_model(ModelConfig(device="cuda", dtype="float32"))
    prompts = [PROMPT, PROMPT[:5] * 3, list(range(300, 340))]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ref = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=resident).generate(prompts, params)
    del resident
    for num_buffers in (2, 5):  # 5: four layers prefetched across passes, waited for before each replay
        streamed = load_model(ModelConfig(device="cuda", dtype="float32", offload=True, enforce_eager=False,
                                          offload_buffers=num_buffers))
        assert streamed.residency.num_resident == 0
        for spec in (SpeculativeConfig(), SpeculativeConfig(method="ngram", max_tree_tokens=8)):
            engine = LLMEngine(EngineConfig(model=ModelConfig(enforce_eager=False), cache=CacheConfig(num_blocks=64),
                                            speculative=spec), loaded=streamed)
            ours = engine.generate(prompts, params)
            assert engine.runner.graphs is not None and engine.runner.graphs.num_captured > 0
            # the one-sequence buckets are captured at start-up, the others on first use
            assert engine.num_graphs_captured == sum(s == 1 for s, _ in engine.graph_buckets.all_buckets())
            assert [o.token_ids for o in ours] == [o.token_ids for o in ref], (num_buffers, spec.method)
        del streamed, engine


def test_offloaded_cost_curve_is_cached_apart_from_the_resident_one(smollm, offloaded, tmp_path, monkeypatch):
    """A pass of an offloaded model costs its copies: its cost curve must not be read back for the
    resident model (or the other way round), whose curve climbs with the tree size."""
    monkeypatch.setenv("SPECSERVE_CACHE_DIR", str(tmp_path))
    spec = SpeculativeConfig(method="ngram", max_tree_tokens=2)
    for loaded in (smollm, offloaded):
        LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=spec), loaded=loaded)
    files = sorted(p.name for p in (tmp_path / "calibration").iterdir())
    resident = offloaded.residency.num_resident
    assert len(files) == 2 and sum(f"-eager-resident{resident}of30-buffers2-" in name for name in files) == 1, files


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_prefetching_offloaded_model_decodes_as_the_resident_one():
    """bf16 with CUDA graphs, as served: 9 working buffers (8 layers prefetched across passes)
    give the resident model's greedy tokens exactly, speculation off and n-gram (same shapes,
    same kernels: the streamed weights are the same bytes)."""
    resident = load_model(ModelConfig(device="cuda", dtype="bfloat16"))
    streamed = load_model(ModelConfig(device="cuda", dtype="bfloat16", offload=True, offload_buffers=9))
    prompts = [PROMPT, PROMPT[:5] * 3, list(range(300, 340))]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for spec in ("off", "ngram"):
        outs = [LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=SpeculativeConfig.parse(spec)),
                          loaded=loaded).generate(prompts, params) for loaded in (resident, streamed)]
        assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]], spec


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_replay_waits_for_a_late_prefetch_and_the_next_prefetch_waits_for_it():
    """A captured forward runs only after the prefetch recorded before it (the runner's
    ``before_graph_replay`` makes the stream wait for ``ready``): with the prefetched buffers
    zeroed and the prefetch held back 0.1 s on the copy stream, the replay still gives the
    logits of a normal one, and ``after_graph_replay``'s next prefetch (issued right after the
    launch, into the buffers the replay reads) does not overwrite them under it.

    (The wait cannot move inside the graph, as an external event's wait node, to let the graph's
    first copies overlap the prefetch's last: on the H200 such a node waited for the event's
    record made *after* the launch (``graph_event_wait_semantics_h200.log``), which here is the
    next prefetch, itself waiting for the replay.)"""
    from specserve.engine.model_runner import TreeBatchItem
    from specserve.tree import TokenTree

    loaded = load_model(ModelConfig(device="cuda", dtype="bfloat16", offload=True, offload_buffers=5))
    engine = LLMEngine(EngineConfig(model=ModelConfig(enforce_eager=False), cache=CacheConfig(num_blocks=64)),
                       loaded=loaded)
    runner, streamer = engine.runner, loaded.model.streamer
    engine.kv_manager.add_sequence("s", PROMPT)
    engine.kv_manager.allocate_slots("s", 0, len(PROMPT))
    item = TreeBatchItem("s", 0, TokenTree.chain(PROMPT))  # the whole prompt: no KV read from before
    expected = runner.run([item], [len(PROMPT) - 1])[0].clone()
    assert runner.graphs is not None and runner.graphs.num_captured > 0
    torch.cuda.synchronize()
    for buffer in streamer.buffers[: streamer.num_prefetched]:
        buffer.zero_()
    torch.cuda.synchronize()
    with torch.cuda.stream(streamer.copy_stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s at 2 GHz, ahead of the prefetch's copies
    streamer.prefetch()
    start = time.perf_counter()
    logits = runner.run([item], [len(PROMPT) - 1])[0]
    torch.cuda.current_stream().synchronize()  # the compute stream alone, not the copy stream's sleep
    assert time.perf_counter() - start > 0.02  # it did wait for the held-back prefetch
    assert torch.equal(logits, expected)


def test_only_streaming_runners_get_replay_hooks_and_partial_forwards_refill_only_what_they_overwrote(smollm):
    """An early-exit drafter over resident layers neither waits for nor redoes the prefetch (no
    replay hooks; no chain graphs over streamed layers either); a forward of few streamed layers
    re-copies only the prefetched buffers it overwrote."""
    from specserve.cache.kv_cache import KVCache
    from specserve.cache.kv_cache_manager import KVCacheManager
    from specserve.engine.chain_graphs import ChainGraphRunner
    from specserve.engine.cuda_graphs import GraphBuckets
    from specserve.engine.model_runner import ModelRunner

    streamed = load_model(ModelConfig(device="cpu", dtype="float32", offload=True, gpu_memory_budget_gb=0.25,
                                      offload_buffers=4, attention_backend="reference"))  # padded steps: no host plan
    model, resident = streamed.model, streamed.residency.num_resident
    buckets = GraphBuckets((1, 2), (1, 2, 4), 8)

    def runner(num_layers):
        manager = KVCacheManager(8, 16, enable_prefix_caching=False)
        cache = KVCache(num_layers, 9, 16, model.cfg.num_kv_heads, model.cfg.head_dim, torch.float32, torch.device("cpu"))
        return ModelRunner(model, cache, manager, num_layers, buckets)

    assert runner(resident).graphs.replay_hooks is None
    assert runner(resident + 2).graphs.replay_hooks is not None and runner(30).graphs.replay_hooks is not None
    with pytest.raises(ValueError, match="resident layers only"):
        ChainGraphRunner(runner(resident + 2).graphs, 3, 2)
    streamer = model.streamer  # 4 buffers: layers 0..2 prefetched
    # layer b + 4 runs from buffer b: 4 layers leave every prefetched buffer alone, 5 overwrite buffer 0
    assert streamer.stale(2) == [] and streamer.stale(4) == [] and streamer.stale(5) == [0]
    assert streamer.stale(6) == [0, 1] and streamer.stale(30 - resident) == [0, 1, 2] and streamer.stale(None) == [0, 1, 2]
    prompt_logits(model, PROMPT)  # a full pass: every prefetched buffer refilled with its layer
    assert all(torch.equal(streamer.buffers[i], streamer.host_flats[i]) for i in range(3))
