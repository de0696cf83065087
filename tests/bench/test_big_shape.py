"""bench.big_shape: its tree, a CPU-sized run's figures, and its input errors."""

from __future__ import annotations

import json
import math

from bench import big_shape
from specserve.models.loader import random_model


def test_heap_tree_is_a_binary_heap():
    tree = big_shape.heap_tree(7)
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 2) and max(tree.depths()) == 2


def test_quick_run_records_every_figure(tmp_path, capsys):
    out = tmp_path / "big.json"
    assert big_shape.main(["--quick", "--repeats", "2", "--tree-sizes", "4,8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "RANDOM" in result["model"] and result["context"] == 32 and result["cuda_graphs"] is False
    assert result["weight_bytes"] == sum(
        p.numel() * 4 for p in random_model(big_shape.TINY, big_shape.torch.device("cpu"),
                                            big_shape.torch.float32).parameters())
    assert math.isnan(result["device_bandwidth_gbps"])  # no device copy off CUDA
    assert result["decode_s"] > 0 and set(result["verify_s"]) == {"4", "8"}
    for n, ratio in result["verify_over_decode"].items():
        assert math.isclose(ratio, result["verify_s"][n] / result["decode_s"])
    assert "verify 8 tree tokens" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(capsys):
    for argv in (["--tree-sizes", "1"], ["--tree-sizes", "x"], ["--repeats", "0"]):
        assert big_shape.main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
