"""The CPU tools under tools/ as a user runs them: tools/ab_checkouts.py
times this checkout against itself, and bad arguments are one line, exit 2."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tool(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "tools" / args[0]), *map(str, args[1:])],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ab_checkouts_times_both_packages_in_one_process():
    done = tool("ab_checkouts.py", REPO, "--configs", "nano-cpu", "--pairs", 2)
    assert done.returncode == 0, done.stderr
    assert re.search(r"nano-cpu +old +[\d.]+ ms +new +[\d.]+ ms +new/old [\d.]+", done.stdout), done.stdout


@pytest.mark.parametrize("args, message", [
    (("ab_checkouts.py", "/nonexistent"), "OLD_CHECKOUT /nonexistent: holds no xpmodel/__init__.py"),
    (("ab_checkouts.py", REPO, "--pairs", 0), "argument --pairs: '0' must be at least 1"),
    (("memory_plan.py", "--seq", 0), "argument --seq: '0' must be at least 1"),
    (("bench_cpu.py", "--rounds", 0), "argument --rounds: '0' must be at least 1"),
    (("soak.py", "--steps", 5), "--warmup 200 must be below --steps 5"),
])
def test_a_bad_argument_is_one_line_and_exit_2(args, message):
    done = tool(*args, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
