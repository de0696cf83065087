import pytest

from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids
from tests.engine.prompts import PROMPTS


@pytest.fixture(scope="session")
def make_engine(smollm):
    """A fresh engine over the shared float32 CPU model; a small KV pool unless told otherwise."""

    def make(num_blocks=512, block_size=16, chunk=512, prefix_caching=True, speculative=None, max_num_seqs=64,
             prefill_hold_steps=0, prefill_hold_ratio=0.25):
        config = EngineConfig(
            model=ModelConfig(dtype="float32", device="cpu"),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, chunk),
                                      prefill_chunk_size=chunk, prefill_hold_steps=prefill_hold_steps,
                                      prefill_hold_ratio=prefill_hold_ratio),
            speculative=speculative or SpeculativeConfig(),
        )
        return LLMEngine(config, loaded=smollm)

    return make


@pytest.fixture(scope="session")
def chat_ids(smollm):
    return [chat_prompt_ids(smollm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
