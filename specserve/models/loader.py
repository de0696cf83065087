"""Load a model: resolve the source, read config and tensors, fill our Llama module, load the tokenizer.

GGUF files are slow to parse and dequantize, so their float32 weights, arch config and
converted tokenizer are kept under ``$SPECSERVE_CACHE_DIR`` (default ~/.cache/specserve),
keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.config import ModelConfig
from specserve.errors import ModelLoadError
from specserve.models.attention import select_attention_backend
from specserve.models.config import LlamaArchConfig, RopeScaling
from specserve.models.gguf_loader import read_gguf
from specserve.models.hf_loader import read_hf
from specserve.models.llama import LlamaForCausalLM
from specserve.models.rope import rope_cos_sin
from specserve.models.source import ModelSource, resolve_model
from specserve.models.tokenizer import load_tokenizer
from specserve.offload.offloaded_model import offload_model
from specserve.offload.planner import ResidencyPlan, plan_residency

CACHE_ENV = "SPECSERVE_CACHE_DIR"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    arch: LlamaArchConfig
    name: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    residency: ResidencyPlan | None = None  # set when layers are offloaded to host memory


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specserve")


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def _arch_to_json(cfg: LlamaArchConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def _arch_from_json(text: str) -> LlamaArchConfig:
    raw = json.loads(text)
    raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    return LlamaArchConfig(**raw)


def read_weights(source: ModelSource) -> tuple[LlamaArchConfig, Iterator[tuple[str, torch.Tensor]], int, Path | None]:
    """(arch, tensors, tensor count, cache folder or None) for either kind of source."""
    if source.kind == "hf":
        return (*read_hf(source.path), None)
    cache_dir = _gguf_cache_dir(source.path)
    weights_file, arch_file = cache_dir / "weights.safetensors", cache_dir / "arch.json"
    if weights_file.is_file() and arch_file.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(weights_file))
        return _arch_from_json(arch_file.read_text()), iter(tensors.items()), len(tensors), cache_dir
    cfg, tensors_iter, count = read_gguf(source.path)
    tensors = dict(tqdm(tensors_iter, total=count, desc="dequantizing GGUF", unit="tensor", disable=None))
    try:
        from safetensors.torch import save_file

        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = weights_file.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(weights_file)
        arch_file.write_text(_arch_to_json(cfg))
    except OSError:
        cache_dir = None  # no cache: the next load parses the GGUF again
    return cfg, iter(tensors.items()), count, cache_dir


def load_model_tokenizer(model: str | None = None):
    """The tokenizer of ``model`` (resolved as ``load_model`` does) without reading its weights:
    a GGUF's converted tokenizer from its cache folder when there, else converted (and kept)."""
    source = resolve_model(model)
    return load_tokenizer(source, None if source.kind == "hf" else _gguf_cache_dir(source.path) / "tokenizer")


def select_backend_name(name: str, device: torch.device) -> str:
    """The attention backend for where the model will run (an offloaded model is built on the
    CPU but runs on ``device``)."""
    return select_attention_backend(device, name).name


def empty_model(
    cfg: LlamaArchConfig, device: torch.device, dtype: torch.dtype, attention_backend: str = "auto",
    model_class: type[LlamaForCausalLM] = LlamaForCausalLM,
) -> LlamaForCausalLM:
    """Uninitialised parameters on ``device`` (no time spent on random init); RoPE table filled.
    ``model_class``: LlamaForCausalLM or a subclass of the same constructor (a feature draft)."""
    with torch.device("meta"):
        model = model_class(cfg, select_attention_backend(device, attention_backend))
    model = model.to(dtype).to_empty(device=device)
    model.cos_sin = rope_cos_sin(
        cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    ).to(device)
    return model.eval().requires_grad_(False)


def random_model(
    cfg: LlamaArchConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, attention_backend: str = "auto"
) -> LlamaForCausalLM:
    """Random weights of a real shape (for speed tests of models we do not have, e.g. Llama-3-8B)."""
    model = empty_model(cfg, device, dtype, attention_backend)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model


def random_loaded(cfg: LlamaArchConfig, device: torch.device, dtype: torch.dtype, name: str) -> LoadedModel:
    """``random_model`` as a loaded model: no tokenizer, the shape's whole context, no EOS (speed
    tests of a shape, not of a model: ``name`` should say the weights are random)."""
    return LoadedModel(random_model(cfg, device, dtype), None, cfg, name, device, dtype, cfg.max_position_embeddings, ())


def _target(name: str, cfg: LlamaArchConfig) -> tuple[str, int] | None:
    """Our parameter name and row offset for a transformers tensor name (None: skip it)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    name = name.removeprefix("model.")
    for proj, offset in (
        ("q_proj", 0),
        ("k_proj", cfg.q_size),
        ("v_proj", cfg.q_size + cfg.kv_size),
    ):
        if f"self_attn.{proj}." in name:
            return name.replace(proj, "qkv_proj"), offset
    if "mlp.gate_proj." in name:
        return name.replace("gate_proj", "gate_up_proj"), 0
    if "mlp.up_proj." in name:
        return name.replace("up_proj", "gate_up_proj"), cfg.intermediate_size
    return name, 0


def fill_weights(
    model: LlamaForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]], count: int, desc: str
) -> None:
    """Copy checkpoint tensors into the model's (fused) parameters; every row must be written once."""
    params = dict(model.named_parameters())
    rows_written = {name: 0 for name in params}
    for name, tensor in tqdm(tensors, total=count, desc=desc, unit="tensor", disable=None):
        target = _target(name, model.cfg)
        if target is None:
            continue
        param_name, offset = target
        param = params.get(param_name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in a Llama-family model")
        rows = tensor.shape[0]
        if offset + rows > param.shape[0] or tuple(tensor.shape[1:]) != tuple(param.shape[1:]):
            raise ModelLoadError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, which does not fit "
                f"{param_name} {tuple(param.shape)}: config.json does not describe these weights"
            )
        param.data[offset : offset + rows].copy_(tensor)
        rows_written[param_name] += rows
    missing = [n for n, rows in rows_written.items() if rows != params[n].shape[0]]
    if missing:
        raise ModelLoadError(f"the checkpoint lacks weights for {', '.join(missing[:4])}")


def load_model(config: ModelConfig) -> LoadedModel:
    source = resolve_model(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    cfg, tensors, count, cache_dir = read_weights(source)
    residency = (plan_residency(cfg, dtype, config.gpu_memory_budget_gb, config.offload_buffers)
                 if config.offload else None)
    build_device = torch.device("cpu") if residency is not None else device
    model = empty_model(cfg, build_device, dtype, select_backend_name(config.attention_backend, device))
    fill_weights(model, tensors, count, desc=f"loading {source.name}")
    if residency is not None:
        model = offload_model(model, device, residency.num_resident, residency.num_buffers)
    tokenizer = load_tokenizer(source, None if cache_dir is None else cache_dir / "tokenizer")
    max_model_len = cfg.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > max_model_len:
            raise ModelLoadError(
                f"--max-model-len {config.max_model_len} exceeds the model's context of {max_model_len}"
            )
        max_model_len = config.max_model_len
    eos = set(cfg.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=cfg,
        name=source.name,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        eos_token_ids=tuple(sorted(eos)),
        residency=residency,
    )
