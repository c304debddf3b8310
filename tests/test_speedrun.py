"""tools/speedrun.py end to end on a small corpus and an easy target: an
xpmodel recipe and the PyTorch reference both cross it, the crossing is
decided on the whole validation split, and the table and JSON say so."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import write_corpus

TOOL = Path(__file__).resolve().parent.parent / "tools" / "speedrun.py"


def run_speedrun(tmp_path, *args):
    """tools/speedrun.py with `args`, on one thread with its own cache; it must succeed."""
    done = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=240, env={"XPMODEL_CACHE": str(tmp_path / "cache"),
                                            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done


def test_two_recipes_reach_an_easy_target(tmp_path):
    pytest.importorskip("torch")
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "speedrun.json"
    done = run_speedrun(tmp_path, "--recipes", "speedrun", "torch-gpt2-adamw", "--data", str(corpus),
                        "--target", "2.5", "--eval-every", "20", "--threads", "1", "--json", str(out))
    assert "time to val loss 2.5" in done.stdout and "speedrun" in done.stdout
    report = json.loads(out.read_text())
    assert report["target"] == 2.5 and report["machine"]["cores"] >= 1
    for run in report["runs"]:
        assert run["reached"], run["recipe"]
        crossing = run["curve"][-1]
        assert crossing["val_full"] <= 2.5 < run["curve"][0]["val_estimate"]
        assert run["tokens"] == run["steps"] * 12 * 64 and run["train_s"] > 0
    assert {run["engine"] for run in report["runs"]} == {"xpmodel", "torch"}


def test_baseline_target_is_the_baselines_loss_at_its_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "speedrun.json"
    done = run_speedrun(tmp_path, "--recipes", "speedrun", "gpt2-adamw", "--data", str(corpus),
                        "--target", "baseline", "--eval-every", "20", "--set", "train.max_iters=40",
                        "--json", str(out))
    baseline, other = json.loads(out.read_text())["runs"]
    assert baseline["recipe"] == "gpt2-adamw" and other["recipe"] == "speedrun"   # baseline first
    assert baseline["steps"] == 40 and baseline["reached"]       # its whole schedule, no more
    assert baseline["target"] == baseline["val_full"] == baseline["curve"][-1]["val_full"]
    assert other["target"] == baseline["target"]
    assert "the target of every run" in done.stdout


def test_every_recipe_has_a_config_at_every_size():
    sys.path.insert(0, str(TOOL.parent))
    import speedrun
    for name in speedrun.RECIPES:
        for size in speedrun.SIZES:
            config = speedrun.load_recipe(name, size, data=None)
            assert config.train.max_iters > 0
            if size.startswith("bpe"):
                assert config.data.tokenizer == "bpe" and config.data.source == "pystdlib"
            if name.startswith("llama"):
                assert config.model.position == "rope" and config.model.norm == "rmsnorm"
