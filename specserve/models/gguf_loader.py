"""GGUF files (llama.cpp's format) through the ``gguf`` library, dequantized to float32.

Names are mapped to transformers' checkpoint names; llama.cpp stores q/k projections of
the "llama" architecture with the rows of each head interleaved for its RoPE layout, which
we undo so the weights match the "rotate half" convention of transformers and our model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specserve.errors import ModelLoadError
from specserve.models.config import LlamaArchConfig, RopeScaling

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the library raises ValueError, KeyError, struct errors...
        raise ModelLoadError(
            f"{str(path)!r} is not a readable GGUF file ({type(exc).__name__}: {exc})"
        ) from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_arch_config(reader) -> LlamaArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    hidden = key("embedding_length")
    num_heads = key("attention.head_count")
    if hidden is None or num_heads is None or key("block_count") is None:
        raise ModelLoadError("the GGUF file lacks the model's shape metadata")
    vocab = key("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = key("rope.scaling.type", "none")
    rope_scaling = RopeScaling()
    if scaling_type == "linear":
        rope_scaling = RopeScaling("linear", float(key("rope.scaling.factor", 1.0)))
    elif scaling_type not in ("none", None):
        raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelLoadError("GGUF files with rope_freqs (Llama 3.1 scaling) are not supported yet")
    tensor_names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaArchConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (its convert script's ``permute``)."""
    rows_per_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, rows_per_half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_tensors(reader, cfg: LlamaArchConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for every tensor of the file."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        match = _LAYER_RE.fullmatch(tensor.name)
        if match:
            suffix = _LAYER_NAMES.get(match.group(2))
            name = None if suffix is None else f"model.layers.{match.group(1)}.{suffix}"
        else:
            name = _GLOBAL_NAMES.get(tensor.name)
        if name is None:
            raise ModelLoadError(f"unexpected tensor {tensor.name!r} in the GGUF file")
        try:
            weight = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {tensor.name}: {exc}") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute_rope_rows(weight, cfg.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute_rope_rows(weight, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.array(weight, dtype=np.float32))


def read_gguf(path: Path) -> tuple[LlamaArchConfig, Iterator[tuple[str, torch.Tensor]], int]:
    """Arch config, a lazy iterator over (name, tensor), and the tensor count."""
    reader = open_gguf(path)
    cfg = gguf_arch_config(reader)
    arch = _field(reader, "general.architecture")
    return cfg, iter_gguf_tensors(reader, cfg, arch), len(reader.tensors)
