"""On CUDA: the engine through the Triton kernel gives the reference backend's tokens (fp32),
and speculation keeps greedy output identical (fp32). Skipped without a GPU."""

import pytest

from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids
from specserve.models.loader import load_model
from tests.engine.prompts import PROMPTS

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cuda_fp32():
    return {b: load_model(ModelConfig(device="cuda", dtype="float32", attention_backend=b)) for b in ("triton", "reference")}


def run(loaded, speculative=None):
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=2048), speculative=speculative or SpeculativeConfig()),
                       loaded=loaded)
    prompts = [chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return [o.token_ids for o in engine.generate(prompts, GREEDY)]


def test_triton_equals_reference_backend_fp32(cuda_fp32):
    assert run(cuda_fp32["triton"]) == run(cuda_fp32["reference"])


@pytest.mark.parametrize("spec", [
    SpeculativeConfig(method="ngram", max_tree_tokens=16),
    SpeculativeConfig(method="early_exit", num_layers=8, tree="dynamic", top_k=4, max_tree_tokens=32),
])
def test_speculation_identical_fp32_on_gpu(cuda_fp32, spec):
    assert run(cuda_fp32["triton"], spec) == run(cuda_fp32["triton"])
