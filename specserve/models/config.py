"""Architecture of a Llama-family model, read from config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specserve.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in transformers' ``rope_scaling`` (types: linear, llama3)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(
                f"rope scaling type {self.rope_type!r} is not supported (supported: "
                f"{', '.join(ROPE_TYPES)})"
            )


@dataclass(frozen=True)
class LlamaArchConfig:
    """Shapes and constants of a Llama-family decoder (Llama, Mistral without sliding window, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # bias on the output projection too (Llama's attention_bias)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ModelLoadError(f"head_dim must be even for RoPE, not {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> LlamaArchConfig:
        """From a transformers config.json dict of a Llama, Mistral or Qwen2 model."""
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        family = SUPPORTED_ARCHITECTURES.get(architectures[0])
        if family is None:
            raise ModelLoadError(
                f"architecture {architectures[0]} is not supported; specserve serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("sliding_window") and raw.get("use_sliding_window", family == "llama"):
            max_pos = raw.get("max_position_embeddings", 0)
            if raw["sliding_window"] < max_pos:
                raise ModelLoadError("sliding-window attention is not supported")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            o_proj_bias=family == "llama" and bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_theta(raw: dict[str, Any]) -> float:
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )
