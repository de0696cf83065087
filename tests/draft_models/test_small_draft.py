"""Small trained drafts: build, save, load (shared embedding, size limit, clear errors)."""

import json

import pytest
import torch

from draft_models.feature_draft import FeatureDraft
from draft_models.small_draft import (
    MAX_WEIGHTS_BYTES,
    WEIGHTS_DIR,
    DraftSpec,
    build_draft_model,
    draft_kv_layers_equivalent,
    load_draft,
    own_tensors,
    save_draft,
)
from specserve.config import CacheConfig, EngineConfig, SamplingParams, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import ModelLoadError, SpecserveError

SPEC = DraftSpec(num_layers=1, init_from_target_layers=(3,))


def one_sentence(message: str) -> bool:
    return "\n" not in message and ". " not in message


@pytest.fixture(scope="module")
def saved(smollm, tmp_path_factory):
    """A 1-layer draft with bf16-exact random weights, saved; (draft, folder)."""
    draft = build_draft_model(DraftSpec(num_layers=1), smollm, seed=7)
    with torch.no_grad():
        for p in own_tensors(draft, DraftSpec(num_layers=1)).values():
            p.copy_(p.to(torch.bfloat16).float())
    folder = tmp_path_factory.mktemp("drafts") / "d"
    save_draft(draft, DraftSpec(num_layers=1), folder, {"note": "test"}, smollm)
    return draft, folder


def test_build_shares_the_target_embedding_and_copies_chosen_layers(smollm):
    draft = build_draft_model(SPEC, smollm)
    assert draft.embed_tokens.weight is smollm.model.embed_tokens.weight
    assert draft.embed_tokens.weight.data_ptr() == smollm.model.embed_tokens.weight.data_ptr()
    assert draft.cfg.num_layers == 1 and draft.cfg.hidden_size == 576 and draft.cfg.num_kv_heads == 3
    assert torch.equal(draft.layers[0].mlp.down_proj.weight, smollm.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(draft.norm.weight, smollm.model.norm.weight)
    assert draft.norm.weight.data_ptr() != smollm.model.norm.weight.data_ptr()  # its own norm
    assert "embed_tokens.weight" not in own_tensors(draft, SPEC)
    assert len(own_tensors(draft, SPEC)) == 1 + 6  # final norm + one layer's 6 tensors


def test_round_trip_is_exact_and_stores_only_own_tensors(smollm, saved):
    from safetensors import safe_open

    draft, folder = saved
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < MAX_WEIGHTS_BYTES
    with safe_open(str(weights), "pt") as f:
        names = set(f.keys())
    assert names == set(own_tensors(draft, DraftSpec(num_layers=1)))
    assert "embed_tokens.weight" not in names
    loaded = load_draft(folder, smollm)
    assert loaded.embed_tokens.weight.data_ptr() == smollm.model.embed_tokens.weight.data_ptr()
    ours, theirs = dict(draft.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((folder / "manifest.json").read_text()) == {"note": "test"}
    assert json.loads((folder / "config.json").read_text())["target"]["name"] == smollm.name
    assert draft_kv_layers_equivalent(folder, smollm) == 1


def test_load_errors_are_one_sentence(smollm, saved, tmp_path):
    _, folder = saved
    with pytest.raises(ModelLoadError, match="was not found") as missing:
        load_draft(tmp_path / "nowhere", smollm)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="has no model.safetensors") as no_weights:
        load_draft(copy, smollm)
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["target"]["embedding_fingerprint"]["probe"][5] += 0.5
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="whose embedding differs") as wrong_target:
        load_draft(copy, smollm)
    config = json.loads((folder / "config.json").read_text())
    config["arch"]["intermediate_size"] = 1024
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="has shape") as bad_shape:
        load_draft(copy, smollm)
    for error in (missing, no_weights, wrong_target, bad_shape):
        assert one_sentence(str(error.value)), str(error.value)


def test_save_refuses_weights_over_the_limit(smollm, tmp_path):
    spec = DraftSpec(num_layers=1, shares_embedding=False)  # its own 49152 x 576 embedding: 57 MB
    draft = build_draft_model(spec, smollm)
    with pytest.raises(SpecserveError, match="over the 20 MB limit"):
        save_draft(draft, spec, tmp_path / "big", {}, smollm)
    assert not (tmp_path / "big" / "model.safetensors").exists()


def test_spec_validation():
    with pytest.raises(SpecserveError, match="one target layer per draft layer"):
        DraftSpec(num_layers=2, init_from_target_layers=(0,))
    with pytest.raises(SpecserveError, match="needs its hidden size 576"):
        DraftSpec(num_layers=1, hidden_size=256).arch_for(_arch())
    with pytest.raises(SpecserveError, match="does not exist"):
        DraftSpec(num_layers=1, init_from_target_layers=(30,)).arch_for(_arch())
    small = DraftSpec(num_layers=2, hidden_size=256, num_heads=4, shares_embedding=False).arch_for(_arch())
    assert (small.hidden_size, small.num_heads, small.num_kv_heads, small.head_dim) == (256, 4, 4, 64)
    assert small.tie_word_embeddings


def _arch():
    from specserve.models.config import LlamaArchConfig

    return LlamaArchConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                           tie_word_embeddings=True)


def test_engine_with_a_saved_draft_keeps_greedy_output(smollm, saved):
    _, folder = saved
    prompt = smollm.tokenizer.encode("The capital of Italy is")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=16)), loaded=smollm).generate([prompt], params)
    spec = SpeculativeConfig(method="draft", draft_model=str(folder), max_tree_tokens=4, max_depth=2, widths=(2, 1))
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=16), speculative=spec), loaded=smollm)
    out = engine.generate([prompt], params)
    assert out[0].token_ids == plain[0].token_ids
    assert out[0].num_draft_tokens > 0


@pytest.mark.parametrize("name", sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir()))
def test_every_committed_draft_loads_for_the_default_model(smollm, name):
    """The drafts in draft_models/weights/ load by name against SmolLM2-135M-Instruct, as the
    class their spec says, and within the size limit."""
    folder = WEIGHTS_DIR / name
    spec = json.loads((folder / "config.json").read_text())["spec"]
    draft = load_draft(name, smollm)
    assert isinstance(draft, FeatureDraft) == bool(spec.get("feature_input"))
    assert draft.cfg.num_layers == spec["num_layers"]
    assert (folder / "model.safetensors").stat().st_size < MAX_WEIGHTS_BYTES


def test_feature_draft_warm_started_from_a_token_draft_reads_only_the_token(smollm, saved):
    """--init-draft: a feature draft built on a saved token draft starts as exactly that draft
    (fc = [identity | 0]: the target's state, however large, adds nothing yet), layers and
    norm copied, fc left as built."""
    from draft_models.dense_forward import causal_hidden, feature_passes

    token_draft, folder = saved
    spec = DraftSpec(num_layers=1, feature_input=True)
    feature = build_draft_model(spec, smollm, seed=5, init_draft=folder)
    for name, tensor in own_tensors(token_draft, DraftSpec(num_layers=1)).items():
        assert torch.equal(own_tensors(feature, spec)[name], tensor), name
    assert torch.count_nonzero(feature.fc.weight[:, 576:]) == 0 and torch.count_nonzero(feature.fc.bias) == 0
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    states = torch.randn(1, 7, 576) * 40.0  # far larger than any real state
    with torch.no_grad():
        (first,) = feature_passes(feature, ids, states, 1)
        assert torch.equal(first, causal_hidden(token_draft, ids))


def test_warm_start_refuses_a_draft_of_another_shape(smollm, saved):
    _, folder = saved
    with pytest.raises(SpecserveError, match="does not fit this draft's shape") as info:
        build_draft_model(DraftSpec(num_layers=2), smollm, init_draft=folder)
    assert "--num-layers" in str(info.value)
    with pytest.raises(ModelLoadError, match="was not found"):
        build_draft_model(DraftSpec(num_layers=1), smollm, init_draft=folder.parent / "absent")
