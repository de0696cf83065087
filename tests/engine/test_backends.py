"""The engine gives the same greedy tokens through every attention backend, the Triton kernel
included (through Triton's interpreter on the CPU), with a tree-shaped speculative step."""

import pytest

from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.models.loader import load_model
from tests.models.test_llama_vs_transformers import save_with_tokenizer
from tests.models.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer_files):  # noqa: F811
    return save_with_tokenizer(tiny_hf_model("llama", seed=11, head_dim=16, hidden_size=64), tmp_path_factory.mktemp("tiny") / "m", tokenizer_files)


def generate(folder, backend, speculative):
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", attention_backend=backend))
    engine = LLMEngine(EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64), speculative=speculative), loaded=loaded)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [3]]
    return engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))


@pytest.mark.parametrize("speculative", [SpeculativeConfig(), SpeculativeConfig(method="ngram", max_tree_tokens=6, max_depth=3, widths=(2, 2, 1))])
def test_backends_agree(tiny_folder, speculative):
    outputs = {b: [o.token_ids for o in generate(tiny_folder, b, speculative)] for b in ("reference", "dense", "triton")}
    assert outputs["dense"] == outputs["reference"] == outputs["triton"]
