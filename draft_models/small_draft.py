"""Small trained drafts: a few-layer Llama that speaks the target's tokenizer and may share its
embedding (and tied LM head) with the target, so its own weights stay a few MB.

A draft lives in one folder::

    config.json        {"format", "arch": the draft's LlamaArchConfig, "spec": DraftSpec,
                        "target": {"name", "embedding_fingerprint"}, "dtype"}
    model.safetensors  the draft's OWN tensors in bf16 (never the shared embedding), <= 20 MB
    manifest.json      how it was trained (data, seed, steps, loss, held-out acceptance)

Invariant of a sharing draft: ``draft.embed_tokens.weight is target.model.embed_tokens.weight``
(the same Parameter, hence the same storage), and the draft never trains it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from draft_models.feature_draft import FeatureDraft
from specserve.errors import ModelLoadError, SpecserveError
from specserve.models.config import LlamaArchConfig, RopeScaling
from specserve.models.llama import LlamaForCausalLM
from specserve.models.loader import LoadedModel, empty_model

FORMAT = "specserve-draft/1"
MAX_WEIGHTS_BYTES = 20_000_000  # committed weights stay under 20 MB each
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FILES = ("config.json", "model.safetensors", "manifest.json")
SHARED_NAMES = ("embed_tokens.weight", "lm_head.weight")  # the target's when the draft shares
_NUM_PROBES = 64


@dataclass(frozen=True)
class DraftSpec:
    """The draft's shape; ``None`` sizes take the target's value.

    init_from_target_layers: draft layer i starts as a copy of target layer
    ``init_from_target_layers[i]`` (one entry per draft layer, target-sized layers only);
    empty: random initialisation.
    feature_input: a feature-level draft (``draft_models.feature_draft``): each token also reads
    the target's hidden state (needs the target's hidden size and a shared embedding).
    """

    num_layers: int = 2
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    shares_embedding: bool = True
    init_from_target_layers: tuple[int, ...] = ()
    feature_input: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_from_target_layers", tuple(self.init_from_target_layers))
        if self.num_layers < 1:
            raise SpecserveError(f"a draft needs at least one layer, not {self.num_layers}")
        sizes = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim)
        if any(size is not None and size < 1 for size in sizes):
            raise SpecserveError("draft sizes must be positive (or left out to take the target's)")
        if self.feature_input and (self.hidden_size is not None or not self.shares_embedding):
            raise SpecserveError(
                "a feature draft reads the target's hidden states through the target's embedding "
                "and head: leave hidden_size out and share the embedding"
            )
        if self.init_from_target_layers and len(self.init_from_target_layers) != self.num_layers:
            raise SpecserveError(
                f"init_from_target_layers names {len(self.init_from_target_layers)} layers for a "
                f"{self.num_layers}-layer draft: give one target layer per draft layer, or none"
            )

    def arch_for(self, target: LlamaArchConfig) -> LlamaArchConfig:
        """The draft's architecture next to ``target`` (same vocabulary, RoPE and special tokens)."""
        hidden = self.hidden_size or target.hidden_size
        num_heads = self.num_heads or target.num_heads
        if self.shares_embedding and hidden != target.hidden_size:
            raise SpecserveError(
                f"a draft that shares the target's embedding needs its hidden size "
                f"{target.hidden_size}, not {hidden}; drop hidden_size or set shares_embedding false"
            )
        arch = dataclasses.replace(
            target,
            hidden_size=hidden,
            intermediate_size=self.intermediate_size or target.intermediate_size,
            num_layers=self.num_layers,
            num_heads=num_heads,
            num_kv_heads=self.num_kv_heads or (target.num_kv_heads if num_heads == target.num_heads else num_heads),
            head_dim=self.head_dim or (target.head_dim if hidden == target.hidden_size else hidden // num_heads),
            tie_word_embeddings=target.tie_word_embeddings if self.shares_embedding else True,
        )
        for index in self.init_from_target_layers:
            if not 0 <= index < target.num_layers:
                raise SpecserveError(f"target layer {index} does not exist (the target has {target.num_layers})")
        if self.init_from_target_layers and _layer_shape(arch) != _layer_shape(target):
            raise SpecserveError("init_from_target_layers needs target-sized layers: leave the draft's sizes out")
        return arch

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "init_from_target_layers": list(self.init_from_target_layers)}


def _layer_shape(arch: LlamaArchConfig) -> tuple[int, ...]:
    return (arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads, arch.head_dim)


def _assemble(arch: LlamaArchConfig, spec: DraftSpec, target: LoadedModel) -> LlamaForCausalLM:
    """An uninitialised draft on the target's device, dtype and attention backend, sharing its
    embedding (and untied head) Parameters when the spec says so."""
    model_class = FeatureDraft if spec.feature_input else LlamaForCausalLM
    draft = empty_model(arch, target.device, target.dtype, target.model.attention.name, model_class)
    if spec.shares_embedding:
        draft.embed_tokens.weight = target.model.embed_tokens.weight
        if target.model.lm_head is not None:
            draft.lm_head.weight = target.model.lm_head.weight
    return draft


def own_tensors(draft: LlamaForCausalLM, spec: DraftSpec) -> dict[str, torch.Tensor]:
    """The draft's parameters that belong to it alone (what is trained and saved)."""
    shared = SHARED_NAMES if spec.shares_embedding else ()
    return {name: p for name, p in draft.named_parameters(remove_duplicate=False) if name not in shared}


@torch.no_grad()
def build_draft_model(
    spec: DraftSpec, target: LoadedModel, seed: int = 0, init_draft: str | Path | None = None
) -> LlamaForCausalLM:
    """A new draft for ``target``: layers copied from the chosen target layers or random
    (normal 0.02, seeded), its own final norm (a copy of the target's when sizes agree). A
    feature draft's ``fc`` starts as [identity | 0]: it first reads the token alone, exactly as
    a token-level draft with the same layers does. (The state half is zero, not noise: the
    target's final-norm states are ~16x the embeddings in scale (SmolLM2: rms 2.0 against
    0.13), so even 0.02 noise there drowned the token the copied layers expect.)

    ``init_draft``: a saved draft (folder or name) whose layers, final norm and, when both are
    feature drafts, ``fc`` replace the above: training continues from it (warm start). Its
    layers must have this spec's shapes."""
    arch = spec.arch_for(target.arch)
    draft = _assemble(arch, spec, target)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in own_tensors(draft, spec).items():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    for layer, index in zip(draft.layers, spec.init_from_target_layers):
        layer.load_state_dict(target.model.layers[index].state_dict())
    if arch.hidden_size == target.arch.hidden_size:
        draft.norm.weight.copy_(target.model.norm.weight)
    if spec.feature_input:
        hidden = arch.hidden_size
        draft.fc.weight.zero_()
        draft.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        draft.fc.bias.zero_()
    if init_draft is not None:
        _warm_start(draft, spec, target, init_draft)
    return draft


def _warm_start(draft: LlamaForCausalLM, spec: DraftSpec, target: LoadedModel, init_draft: str | Path) -> None:
    """Copy a saved draft's own tensors (all but ``fc`` when it is not a feature draft) into ``draft``."""
    saved = load_draft(init_draft, target)
    saved_arch, saved_spec, _ = read_draft_config(resolve_draft_folder(init_draft))
    if _layer_shape(saved_arch) != _layer_shape(draft.cfg) or saved_arch.num_layers != draft.cfg.num_layers:
        raise SpecserveError(
            f"--init-draft {str(init_draft)!r} does not fit this draft's shape ({saved_arch.num_layers} layers of "
            f"{_layer_shape(saved_arch)} there, {draft.cfg.num_layers} of {_layer_shape(draft.cfg)} here as "
            "(hidden, intermediate, heads, kv heads, head dim)): give --num-layers and sizes equal to that draft's"
        )
    ours, theirs = own_tensors(draft, spec), own_tensors(saved, saved_spec)
    wanted = [name for name in ours if not (name.startswith("fc.") and not saved_spec.feature_input)]
    for name in wanted:
        if name not in theirs or tuple(theirs[name].shape) != tuple(ours[name].shape):
            raise SpecserveError(
                f"--init-draft {str(init_draft)!r} does not fit this draft's shape ({name} is "
                f"{tuple(theirs[name].shape) if name in theirs else 'missing'} there, {tuple(ours[name].shape)} "
                "here): give --num-layers and sizes equal to that draft's"
            )
        ours[name].copy_(theirs[name])


def embedding_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """Shape plus 64 probed values of an embedding, robust to bf16/fp16/fp32 storage."""
    rows = torch.linspace(0, weight.shape[0] - 1, _NUM_PROBES).long()
    cols = (rows * 7919) % weight.shape[1]
    probe = weight.detach()[rows.to(weight.device), cols.to(weight.device)].float().cpu()
    return {"shape": list(weight.shape), "probe": [round(v, 7) for v in probe.tolist()]}


def fingerprints_match(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    if saved.get("shape") != current["shape"] or len(saved.get("probe", [])) != _NUM_PROBES:
        return False
    a, b = torch.tensor(saved["probe"]), torch.tensor(current["probe"])
    return bool(torch.allclose(a, b, rtol=2e-2, atol=1e-4))


def save_draft(
    model: LlamaForCausalLM, spec: DraftSpec, folder: str | Path, manifest: dict[str, Any], target: LoadedModel
) -> Path:
    """Write config.json, model.safetensors (own tensors, bf16) and manifest.json into ``folder``."""
    from safetensors.torch import save_file

    tensors = {
        name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in own_tensors(model, spec).items()
    }
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if num_bytes > MAX_WEIGHTS_BYTES:
        raise SpecserveError(
            f"the draft's own weights take {num_bytes / 1e6:.1f} MB, over the {MAX_WEIGHTS_BYTES / 1e6:.0f} MB "
            "limit: use fewer layers, a smaller intermediate size or a shared embedding"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES, f"{weights} exceeds {MAX_WEIGHTS_BYTES} bytes"
    config = {
        "format": FORMAT,
        "arch": dataclasses.asdict(model.cfg),
        "spec": spec.to_dict(),
        "target": {
            "name": target.name,
            "embedding_fingerprint": embedding_fingerprint(target.model.embed_tokens.weight),
        },
        "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_manifest(folder, manifest)
    return folder


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """(Re)write a draft folder's manifest.json."""
    (Path(folder) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def resolve_draft_folder(name_or_folder: str | Path) -> Path:
    """A folder path, else the name of a folder under draft_models/weights/."""
    path = Path(name_or_folder).expanduser()
    if path.is_dir():
        return path
    if (WEIGHTS_DIR / str(name_or_folder)).is_dir():
        return WEIGHTS_DIR / str(name_or_folder)
    raise ModelLoadError(
        f"draft model {str(name_or_folder)!r} was not found: pass a draft folder or the name of one "
        f"under {WEIGHTS_DIR} (train one with `python -m draft_models.train`)"
    )


def read_draft_config(folder: Path) -> tuple[LlamaArchConfig, DraftSpec, dict[str, Any]]:
    for name in FILES[:2]:
        if not (folder / name).is_file():
            raise ModelLoadError(
                f"draft folder {str(folder)!r} has no {name}: point at a folder written by "
                "`python -m draft_models.train`"
            )
    try:
        raw = json.loads((folder / "config.json").read_text())
        arch_raw = dict(raw["arch"])
        arch_raw["rope_scaling"] = RopeScaling(**arch_raw["rope_scaling"])
        arch_raw["eos_token_ids"] = tuple(arch_raw["eos_token_ids"])
        arch = LlamaArchConfig(**arch_raw)
        spec = DraftSpec(**raw["spec"])
        target_info = raw["target"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{str(folder / 'config.json')!r} is not a draft config ({exc!r}): retrain or restore the file"
        ) from None
    return arch, spec, target_info


def load_draft(name_or_folder: str | Path, target: LoadedModel) -> LlamaForCausalLM:
    """The trained draft in ``name_or_folder``, wired to ``target`` (shared embedding, device,
    dtype, attention backend); raises ModelLoadError when it was trained for another target."""
    from safetensors.torch import load_file

    folder = resolve_draft_folder(name_or_folder)
    arch, spec, target_info = read_draft_config(folder)
    current = embedding_fingerprint(target.model.embed_tokens.weight)
    if not fingerprints_match(target_info.get("embedding_fingerprint", {}), current):
        raise ModelLoadError(
            f"draft {str(folder)!r} was trained for target {target_info.get('name')!r}, whose embedding "
            f"differs from the loaded {target.name!r}: load that target or train a draft for this one"
        )
    if spec.shares_embedding and arch.hidden_size != target.arch.hidden_size:
        raise ModelLoadError(f"draft {str(folder)!r} shares an embedding of another width than the target's")
    draft = _assemble(arch, spec, target)
    params = own_tensors(draft, spec)
    tensors = load_file(str(folder / "model.safetensors"))
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ModelLoadError(
            f"draft weights in {str(folder)!r} do not match its config.json (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): the folder's files do not belong together"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ModelLoadError(
                    f"draft tensor {name} has shape {tuple(tensors[name].shape)} but config.json describes "
                    f"{tuple(param.shape)}: the folder's files do not belong together"
                )
            param.copy_(tensors[name])
    return draft


def draft_kv_layers_equivalent(name_or_folder: str | Path, target: LoadedModel) -> int:
    """Target-shaped KV layers the draft's cache takes per token (rounded up), read from config.json."""
    arch, _, _ = read_draft_config(resolve_draft_folder(name_or_folder))
    per_layer = arch.num_kv_heads * arch.head_dim
    return math.ceil(arch.num_layers * per_layer / (target.arch.num_kv_heads * target.arch.head_dim))
