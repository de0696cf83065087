"""bench.host_overhead on the tiny random model: the per-kind step table and the saved profile."""

import json

from bench import host_overhead


def test_tiny_run_counts_steps_by_kind_and_saves_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ho.json"
    argv = ["--rounds", "1", "--num-requests", "8", "--batch-size", "4", "--max-tokens", "16", "--cprofile",
            "--device", "cpu", "--out", str(out)]
    assert host_overhead.main(argv) == 0
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert set(results) == {"off", "ngram"}
    for kinds in results.values():
        counts = {kind: figures["steps_per_round"] for kind, figures in kinds.items()}
        assert counts["all"] == counts["plain"] + counts["drafting"] + counts["prefill"]
    assert results["off"]["drafting"]["steps_per_round"] == 0
    assert results["ngram"]["drafting"]["steps_per_round"] > 0  # under 8 in flight the gate never closes
    rows = saved["cprofile_own_per_step"]
    assert 0 < len(rows) <= 25 and set(rows[0]) == {"function", "calls", "ms"}
    assert [abs(r["ms"]) for r in rows] == sorted((abs(r["ms"]) for r in rows), reverse=True)
