"""``specserve generate``'s sampling-control flags, parsed in-process (no model is loaded)."""

import pytest

from specserve.cli.generate import parse_logit_bias
from specserve.cli.main import main
from specserve.errors import SpecserveError


def test_logit_bias_flags_become_sorted_pairs():
    assert parse_logit_bias(["42=-5", "7=1.5", "42=1"]) == ((7, 1.5), (42, 1.0))
    assert parse_logit_bias([]) == ()
    for bad in ("42", "x=1", "4=y"):
        with pytest.raises(SpecserveError, match="ID=BIAS"):
            parse_logit_bias([bad])


@pytest.mark.parametrize(("flags", "needle"), [(["--min-p", "2"], "min_p"),
                                               (["--repetition-penalty", "0"], "repetition_penalty"),
                                               (["--logit-bias", "5=500"], "logit_bias")])
def test_out_of_range_controls_are_one_line_errors(flags, needle, capsys):
    assert main(["generate", "Hi", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specserve: error: ") and needle in err and err.count("\n") == 1
