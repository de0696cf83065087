"""The tiny end-to-end training run (`python -m draft_models.train --device cpu --tiny`)."""

import json
from dataclasses import replace

import pytest
import torch

from draft_models import pipeline
from draft_models.pipeline import run
from draft_models.small_draft import MAX_WEIGHTS_BYTES, load_draft
from draft_models.train import config_from_args
from specserve.errors import SpecserveError

MANIFEST_FIELDS = {
    "draft", "index", "num_drafts", "target", "spec", "data", "seed", "boost", "training", "heldout",
    "wall_s", "environment", "command",
}
TRAINING_FIELDS = {"steps", "tokens_seen", "rows_seen", "first_loss", "final_loss", "stopped_by", "lr", "seed"}


@pytest.fixture(scope="module")
def tiny_run(smollm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    argv = ["--device", "cpu", "--tiny", "--num-drafts", "2", "--out-dir", str(folder),
            "--samples", str(folder / "samples.jsonl")]
    return config_from_args(argv), run(config_from_args(argv), loaded=smollm), folder


def test_loss_decreases_and_manifest_is_complete(tiny_run):
    cfg, manifests, folder = tiny_run
    assert cfg.spec.num_layers == 1 and cfg.train.seed == 0
    assert [m["draft"] for m in manifests] == ["tiny-draft-1", "tiny-draft-2"]
    for manifest in manifests:
        assert MANIFEST_FIELDS <= manifest.keys()
        training = manifest["training"]
        assert TRAINING_FIELDS <= training.keys()
        assert training["steps"] == 12 and training["stopped_by"] == "steps"
        assert training["final_loss"] < training["first_loss"]
        assert manifest["data"]["train_prompts"]["count"] == 6
        assert manifest["data"]["heldout_prompts"]["count"] == 2
        assert manifest["environment"]["torch"]
        heldout = manifest["heldout"]
        assert {"top1_agreement", "chain_mean_accepted_length", "static_tree", "engine"} <= heldout.keys()
        assert heldout["engine"]["status"] == "measured"
        assert heldout["engine"]["identical_to_greedy"] == 2
        saved = json.loads((folder / manifest["draft"] / "manifest.json").read_text())
        assert saved["heldout"]["engine"] == heldout["engine"]
        assert (folder / manifest["draft"] / "model.safetensors").stat().st_size < MAX_WEIGHTS_BYTES
    assert manifests[0]["boost"]["earlier_drafts"] == 0 and manifests[0]["boost"]["weight_max"] == 1.0
    assert manifests[1]["boost"]["earlier_drafts"] == 1 and manifests[1]["boost"]["weight_max"] > 1.0


def test_saved_tiny_draft_loads_and_samples_are_reused(tiny_run, smollm, monkeypatch):
    cfg, manifests, folder = tiny_run
    draft = load_draft(folder / "tiny-draft-1", smollm)
    assert draft.cfg.num_layers == 1
    header = json.loads((folder / "samples.jsonl").read_text().splitlines()[0])
    assert header["key"] == manifests[0]["data"]["samples"]["key"]

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the cached continuations should have been reused")

    monkeypatch.setattr(pipeline, "generate_samples", must_not_generate)
    assert pipeline.run(replace(cfg, stage="generate"), loaded=smollm) == []
    # --samples-dtype names the dtype they were generated in: the same (float32) is reused, another
    # finds nothing to reuse and is refused rather than regenerated in the wrong dtype
    assert pipeline.run(replace(cfg, stage="generate", samples_dtype="float32"), loaded=smollm) == []
    with pytest.raises(SpecserveError, match="generated in torch.bfloat16"):
        pipeline.run(replace(cfg, stage="generate", samples_dtype="bfloat16"), loaded=smollm)
    with pytest.raises(SpecserveError, match="--samples-dtype must be"):
        replace(cfg, samples_dtype="int8")
    # --seed is training's alone: another seed reuses the continuations; --data-seed's are others
    assert pipeline.run(replace(cfg, stage="generate", train=replace(cfg.train, seed=5)), loaded=smollm) == []
    with pytest.raises(AssertionError, match="should have been reused"):
        pipeline.run(replace(cfg, stage="generate", data_seed=1), loaded=smollm)
    with pytest.raises(SpecserveError, match="was not found"):  # before any generation
        pipeline.run(replace(cfg, boost_against=(str(folder / "absent"),)), loaded=smollm)


def test_tiny_feature_draft_run(tiny_run, smollm):
    """--feature: a feature draft trained unrolled (reusing the tiny run's continuations),
    warm-started from the tiny token draft (--init-draft, named in the manifest); its held-out
    figures come per depth and the engine runs it with greedy output unchanged."""
    _, manifests, folder = tiny_run
    argv = ["--device", "cpu", "--tiny", "--feature", "--feature-passes", "2", "--name", "tiny-feature",
            "--out-dir", str(folder), "--samples", str(folder / "samples.jsonl"),
            "--init-draft", str(folder / "tiny-draft-1"), "--boost-against", str(folder / "tiny-draft-1")]
    cfg = config_from_args(argv)
    assert cfg.spec.feature_input and cfg.train.feature_passes == 2
    (manifest,) = run(cfg, loaded=smollm)
    assert manifests[0]["init_draft"] is None
    assert manifest["init_draft"]["draft"] == "tiny-draft-1" and manifest["init_draft"]["steps"] == 12
    boost = manifest["boost"]  # boosted against the saved draft as if it had trained first in this run
    assert boost["earlier_drafts"] == 1 and boost["boosted_against"] == [str(folder / "tiny-draft-1")]
    assert (boost["weight_min"], boost["weight_max"]) == (manifests[1]["boost"]["weight_min"],
                                                          manifests[1]["boost"]["weight_max"])
    assert boost["weight_max"] > 1.0
    assert manifest["data"]["samples"]["reused_from_cache"] is True
    training = manifest["training"]
    assert training["final_loss"] < training["first_loss"] and training["feature_passes"] == 2
    heldout = manifest["heldout"]
    assert len(heldout["top1_agreement_by_depth"]) == 8
    assert heldout["top1_agreement"] == heldout["top1_agreement_by_depth"][0]
    assert heldout["engine"]["status"] == "measured" and heldout["engine"]["identical_to_greedy"] == 2
    assert type(load_draft(folder / "tiny-feature-1", smollm)).__name__ == "FeatureDraft"


def test_token_draft_boosted_against_a_feature_draft(tiny_run, smollm):
    """--boost-against a saved feature draft: its depth-1 ranks need the target's states, which
    teacher forcing keeps for the training set alone (and only for those ranks)."""
    _, _, folder = tiny_run
    if not (folder / "tiny-feature-1").is_dir():
        pytest.skip("needs test_tiny_feature_draft_run's draft")
    argv = ["--device", "cpu", "--tiny", "--steps", "2", "--no-engine-eval", "--name", "tiny-boosted",
            "--out-dir", str(folder), "--samples", str(folder / "samples.jsonl"),
            "--boost-against", str(folder / "tiny-feature-1"), "--boost-against", str(folder / "tiny-draft-1")]
    (manifest,) = run(config_from_args(argv), loaded=smollm)
    boost = manifest["boost"]
    assert boost["earlier_drafts"] == 2 and [p.rsplit("/", 1)[1] for p in boost["boosted_against"]] == [
        "tiny-feature-1", "tiny-draft-1"]
    assert boost["weight_max"] > 1.0 and manifest["training"]["steps"] == 2


# Without AVX-512, torch's CPU bfloat16 matmuls take a slow path: on a 2-core AVX2 machine the
# draft's head (1,024 rows x 576 x 49,152 vocab, forward and backward) took 150 s in bfloat16
# against 4.4 s in float32, so the run's 5-minute budget stopped it after 2 steps.
SLOW_CPU_BF16 = torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX")


@pytest.mark.skipif(SLOW_CPU_BF16, reason=f"CPU bfloat16 matmuls are ~35x float32's on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()}): the run would stop by time")
def test_tiny_feature_draft_run_in_bfloat16(tiny_run):
    """The mixed-precision path a GPU takes (autocast, a bf16 target), here on the CPU: the
    unrolled passes' logits are computed under autocast like the states they come from."""
    _, _, folder = tiny_run
    argv = ["--device", "cpu", "--dtype", "bfloat16", "--tiny", "--feature", "--feature-passes", "2",
            "--name", "tiny-feature-bf16", "--out-dir", str(folder), "--samples", str(folder / "samples-bf16.jsonl"),
            "--no-engine-eval"]
    (manifest,) = run(config_from_args(argv))
    assert manifest["target"]["dtype"] == "torch.bfloat16"
    assert manifest["training"]["final_loss"] < manifest["training"]["first_loss"]
