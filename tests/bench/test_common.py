"""bench.common.save_json: a file is replaced whole or not at all."""

import json

import pytest

from bench.common import save_json


def test_save_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "r" / "run.json"
    assert save_json("run", {"a": 1}, out) == out
    save_json("run", {"a": 2, "b": [1, 2]}, out)
    assert json.loads(out.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["run.json"]


def test_a_save_cut_short_keeps_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "run.json"
    save_json("run", {"done": 1}, out)

    def killed(src, dst):  # the process dies after writing the temporary, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("bench.common.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_json("run", {"done": 2}, out)
    assert json.loads(out.read_text()) == {"done": 1}
