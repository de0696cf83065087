"""Random tiny checkpoints written by transformers' own save_pretrained, for loader tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A random transformers model: kind "llama" or "qwen2"; overrides go into its config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(overrides)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # fresh init leaves some norms at exactly 1; perturb everything
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.float().eval()


def save_tiny(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return folder
