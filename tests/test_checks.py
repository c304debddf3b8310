"""xpmodel/checks.py: the number checks the run config and the Python API share;
files.read_json's message for what Python will not parse; how a message shows
a path (errors.shown_path)."""
import sys

import numpy as np
import pytest

from xpmodel.checks import NON_NEGATIVE, POSITIVE, Range, check_integer, check_number
from xpmodel.errors import DataError
from xpmodel.files import read_json


def test_numbers_and_integers_come_back_as_python_types():
    assert check_number("lr", np.float32(0.5), POSITIVE) == 0.5
    assert type(check_number("lr", np.float32(0.5), POSITIVE)) is float
    assert check_integer("n", np.int64(3)) == 3 and type(check_integer("n", np.int64(3))) is int


@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400, float("nan"), float("inf"), True, "1"])
def test_a_number_that_is_no_finite_float_is_one_line_naming_it(value):
    with pytest.raises(ValueError) as info:
        check_number("alpha", value, NON_NEGATIVE)
    message = str(info.value)
    assert message.startswith("alpha must be a finite number >= 0, got ")
    assert "\n" not in message and len(message) < 160          # a 401-digit value is cut


def test_integer_bounds_hold_past_float_range():
    assert check_integer("steps", 10 ** 30, Range(0, 10 ** 31)) == 10 ** 30
    with pytest.raises(ValueError, match=r"steps must be an integer in \[0, 10"):
        check_integer("steps", 10 ** 400, Range(0, 10 ** 31))
    with pytest.raises(ValueError, match="must be an integer >= 0, got 1.0"):
        check_integer("steps", 1.0)


def test_json_with_an_integer_python_will_not_read_names_the_file(tmp_path):
    if not hasattr(sys, "get_int_max_str_digits"):
        pytest.skip("this Python reads integers of any length")
    path = tmp_path / "config.json"
    path.write_text('{"n_embd": ' + "9" * 5000 + "}")
    with pytest.raises(DataError) as info:
        read_json(path, 1 << 20, DataError, "config")
    assert str(info.value) == f"{path}: config is not valid JSON (an integer of more than 4300 digits)"


def test_a_path_in_a_message_is_exact_on_one_line_and_cut_at_both_ends(tmp_path):
    from xpmodel.data import resolve_source
    from xpmodel.errors import shown_path
    assert shown_path("my  corpus.txt") == "my  corpus.txt"          # spaces kept as they are
    assert shown_path("a\nb\u2028c") == "a\\nb\\u2028c"
    long = "/".join(["dir"] * 100) + "/end.txt"
    shown = shown_path(long)
    assert len(shown) <= 200 and shown.startswith("dir/dir") and shown.endswith("dir/end.txt")
    missing = tmp_path / "two  spaces\n.txt"
    with pytest.raises(DataError) as info:
        resolve_source(str(missing))
    assert str(info.value) == f"{shown_path(missing)}: no such file or folder"
    assert "two  spaces\\n.txt" in str(info.value) and "\n" not in str(info.value)
