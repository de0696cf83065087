"""bench.offload --quick on the CPU: passes and decoding, off and on, for every buffer count."""

import json
import subprocess
import sys


def test_quick_run_decodes_side_by_side_for_every_buffer_count(tmp_path):
    out = tmp_path / "offload.json"
    done = subprocess.run([sys.executable, "-m", "bench.offload", "--quick", "--num-buffers", "2,3", "--out", str(out)],
                          check=True, capture_output=True, text=True, timeout=600)
    for png in ("offload_passes.png", "offload_decode.png"):  # drawn next to the JSON
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"-> {tmp_path / png}" in done.stdout
    model = json.loads(out.read_text())["models"]["smollm2-135m (real weights, fully offloaded)"]
    assert sorted(model["passes_by_num_buffers"]) == sorted(model["decode_by_num_buffers"]) == ["2", "3"]
    for count in ("2", "3"):
        assert sorted(model["passes_by_num_buffers"][count]["eager"]["pass_s"]) == ["1", "8"]
        decode = model["decode_by_num_buffers"][count]["eager"]
        # 3 prompts, the first warms up: 2 x 4 greedy tokens each way, and fp32 speculation changes none
        assert decode["speculation_off"]["tokens"] == decode["speculation_on"]["tokens"] == 8
        assert decode["identical_outputs"] == 2
    assert model["decode_num_buffers"] in (2, 3) and model["num_buffers"] in (2, 3)


def test_bad_buffer_count_is_refused():
    done = subprocess.run([sys.executable, "-m", "bench.offload", "--quick", "--num-buffers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--num-buffers: every count must be at least 2" in done.stderr


def test_plots_redrawn_from_json_label_the_random_shape_estimate(tmp_path):
    """bench.plots redraws an offload result from its JSON (string keys), the 8B shape's
    speculation bar included; the summary of such a result names the estimate."""
    result = {
        "benchmark": "offload", "host_to_device_gbps": 55.0, "environment": {"device": "test"},
        "models": {
            "real": {"passes_by_num_buffers": {"9": {"graphs": {"pass_s": {"1": 0.004, "256": 0.0043},
                                                                "pass_over_floor": {"1": 1.06, "256": 1.11}}}},
                     "decode_by_num_buffers": {"9": {"graphs": {"speculation_off": {"ms_per_token": 4.0},
                                                                "speculation_on": {"ms_per_token": 1.0}}}}},
            "8b (RANDOM)": {"num_buffers": 9, "passes": {"graphs": {"pass_s": {"1": 0.16}, "pass_over_floor": {"1": 1.0}}},
                            "tokens_per_s_off": 6.0, "tokens_per_s_spec_estimated": 24.0},
        },
    }
    path = tmp_path / "offload_x.json"
    path.write_text(json.dumps(result))
    done = subprocess.run([sys.executable, "-m", "bench.plots", str(path)], check=True, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["->", str(tmp_path / "offload_x_passes.png"), "->", str(tmp_path / "offload_x_decode.png")]
