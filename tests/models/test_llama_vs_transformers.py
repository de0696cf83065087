"""Our forward (paged KV, tree attention reference) equals transformers' on the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from specserve.config import ModelConfig
from specserve.engine.model_runner import prompt_logits
from specserve.models.loader import load_model
from tests.models.tiny import save_tiny, tiny_hf_model

PROMPT_IDS = [1, 5, 17, 99, 3, 42, 42, 7, 64, 120, 11, 2, 33, 80, 9, 15, 16, 100, 101, 6]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def save_with_tokenizer(model, folder, tokenizer_files, max_shard_size=None):
    save_tiny(model, folder, max_shard_size)
    for file in tokenizer_files.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-rope-llama3": ("llama", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sharded", [False, True])
def test_tiny_checkpoint_folder_matches_transformers(case, sharded, tmp_path, tokenizer_files):
    kind, overrides = CASES[case]
    hf_model = tiny_hf_model(kind, seed=len(case), **overrides)
    folder = save_with_tokenizer(hf_model, tmp_path / case, tokenizer_files, "60KB" if sharded else None)
    if sharded:
        assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
    ours = prompt_logits(loaded.model, PROMPT_IDS)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([PROMPT_IDS])).logits[0]
    assert ours.shape == theirs.shape == (len(PROMPT_IDS), 128)
    assert relative_error(ours, theirs) < 1e-4


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm, smollm_gguf_path):
    """transformers dequantizes the same GGUF with its own loader (its own q/k un-permutation)."""
    from transformers import AutoModelForCausalLM

    theirs_model = AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf_path.parent), gguf_file=smollm_gguf_path.name, dtype=torch.float32
    ).eval()
    text = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
    ids = smollm.tokenizer.encode(text) + [1, 520, 9531, 198]
    ours = prompt_logits(smollm.model, ids)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits[0]
    assert relative_error(ours, theirs) < 1e-4
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(dtype, tmp_path, tokenizer_files):
    hf_model = tiny_hf_model("llama", seed=3)
    folder = save_with_tokenizer(hf_model, tmp_path / "m", tokenizer_files)
    full = load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))
    half = load_model(ModelConfig(model=str(folder), dtype=dtype, device="cpu"))
    assert half.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    ours, reference = prompt_logits(half.model, PROMPT_IDS), prompt_logits(full.model, PROMPT_IDS)
    assert relative_error(ours, reference) < 3e-2
