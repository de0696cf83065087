"""The model with the fused layer kernels (norm, rope + K/V write, silu-mul; Triton's interpreter
on the CPU) gives the logits of the PyTorch ops, through the paged cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specserve.config import ModelConfig
from specserve.engine.model_runner import prompt_logits
from specserve.models.llama import LlamaForCausalLM
from specserve.models.loader import load_model
from tests.models.test_llama_vs_transformers import PROMPT_IDS, relative_error, save_with_tokenizer
from tests.models.tiny import tiny_hf_model


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False}),
])
def test_fused_layers_match_the_pytorch_ops(kind, overrides, tmp_path, tokenizer_files):
    folder = save_with_tokenizer(tiny_hf_model(kind, seed=3, **overrides), tmp_path / kind, tokenizer_files)
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", attention_backend="reference"))
    assert not loaded.model.attention.fused_ops
    fused = LlamaForCausalLM(loaded.arch, dataclasses.replace(loaded.model.attention, fused_ops=True))
    fused.load_state_dict(loaded.model.state_dict())
    ours, theirs = prompt_logits(fused.eval(), PROMPT_IDS), prompt_logits(loaded.model, PROMPT_IDS)
    assert relative_error(ours, theirs) < 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_greedy_output_with_fused_kernels_equals_the_pytorch_ops_on_cuda(dtype):
    """fp32: identical token streams; bf16: the fraction of identical tokens is printed, and
    every stream parts at a near-tie (the kernels round where the ops round, but sum and
    contract in their own order)."""
    from specserve.config import CacheConfig, EngineConfig, SamplingParams
    from specserve.engine.llm_engine import LLMEngine
    from specserve.engine.prompts import chat_prompt_ids
    from tests.engine.near_ties import NEAR_TIE, first_divergence_gaps
    from tests.engine.prompts import PROMPTS

    loaded = load_model(ModelConfig(device="cuda", dtype=dtype))
    assert loaded.model.attention.fused_ops
    plain = LlamaForCausalLM(loaded.arch, dataclasses.replace(loaded.model.attention, fused_ops=False))
    plain = plain.to(loaded.dtype).to(loaded.device).eval()
    plain.load_state_dict(loaded.model.state_dict())
    plain.cos_sin = loaded.model.cos_sin  # float32, as the loader keeps it (``to(dtype)`` rounded it)
    prompts = [chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS[:20]]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    outputs = []
    for model in (loaded.model, plain):
        engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=512)), loaded=dataclasses.replace(loaded, model=model))
        outputs.append([o.token_ids for o in engine.generate(prompts, params)])
    fused, ops = outputs
    equal = sum(a == b for x, y in zip(fused, ops) for a, b in zip(x, y))
    print(f"\n{dtype}: {equal}/{sum(map(len, ops))} tokens equal, {sum(x == y for x, y in zip(fused, ops))}/20 outputs identical")
    if dtype == "float32":
        assert fused == ops
    gaps = first_divergence_gaps(plain, prompts, ops, fused)
    print(f"logit gaps where the streams part: {[round(g, 3) for g in gaps]}")
    assert all(gap <= NEAR_TIE for gap in gaps)
