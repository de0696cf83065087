"""bench.kernel_tree_attention's CPU smoke run (Triton interpreter): the report it writes."""

from __future__ import annotations

import json

from bench.kernel_tree_attention import config_grid, main


def test_quick_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "kernel.json"
    main(["--quick", "--rep-ms", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["rep_ms"] == 3 and report["dtype"] == "float32"
    rows = report["results"]
    assert [(r["tree_len"], r["context_len"], r["batch"]) for r in rows] == [
        (c.tree_len, c.context_len, c.batch) for c in config_grid(quick=True)
    ]
    assert all(r["max_abs_error"] < 1e-5 for r in rows)  # the kernel equals gather + SDPA
    assert all(r["ratio_vs_baseline"] == r["kernel_ms"] / r["baseline_ms"] for r in rows)
    assert not (tmp_path / "kernel.json.tmp").exists()
