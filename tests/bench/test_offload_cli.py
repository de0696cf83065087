"""bench.offload --quick on the CPU: passes and decoding, off and on, for every buffer count."""

import json
import subprocess
import sys


def test_quick_run_decodes_side_by_side_for_every_buffer_count(tmp_path):
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, "-m", "bench.offload", "--quick", "--num-buffers", "2,3", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
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
