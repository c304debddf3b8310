"""Running the command line inside the test process, what its errors look like,
a small corpus to train on, and a tiny run trained once for tests to copy."""
import os
import random
import shutil
from pathlib import Path

from xpmodel.cli import main as cli


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `xpmodel ARGS` run in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:   # argparse's --help and usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err


def write_corpus(path, lines=1500, seed=0):
    """Deterministic English-like text, about 45 KB."""
    words = ("the king shall speak of love and war to my lord good night sweet prince "
             "what is this fair day come hither now").split()
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def kill_sweep_mid_trial(sweep, trial, steps=60, timeout=300):
    """kill -9 a running `xpmodel sweep` process once the trial in the run
    folder `trial` has trained `steps` steps, then wait until that trial, told
    to stop when its parent died, has saved and released its run lock. The
    timeout only stops a hung test: a busy 2-core machine may take a minute
    to reach the trial."""
    import signal
    import time
    from xpmodel.train.rundir import RunDir
    run = RunDir(trial)
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [r["step"] for r in run.read_metrics(warn=lambda text: None)
                if r["type"] == "train"] if run.is_run() else []
        if done and done[-1] >= steps:
            break
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    while time.time() < deadline and run.is_locked():
        time.sleep(0.05)


def train_tiny_run(root, *overrides):
    """{"run", "corpus"}: tests/tiny-run.yaml trained by `xpmodel train` in
    `root` on a small corpus, with `overrides`, and its own cache there."""
    corpus = write_corpus(root / "corpus.txt", lines=300)
    run = root / "run"
    old = os.environ.get("XPMODEL_CACHE")
    os.environ["XPMODEL_CACHE"] = str(root / "cache")
    try:
        tiny = Path(__file__).resolve().parent / "tiny-run.yaml"
        assert cli.main(["train", "--config", str(tiny), "--quiet", "--out", str(run),
                         f"data.source={corpus}", *overrides]) == 0
    finally:
        if old is None:
            os.environ.pop("XPMODEL_CACHE")
        else:
            os.environ["XPMODEL_CACHE"] = old
    return {"run": run, "corpus": corpus}


def copy_run(trained, tmp_path):
    """A copy of train_tiny_run's run in `tmp_path`, for a test to change."""
    target = tmp_path / "run"
    shutil.copytree(trained["run"], target)
    return target
