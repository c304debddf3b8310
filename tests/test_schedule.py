"""Learning-rate schedules: each shape at its landmarks, the config keys that
choose them, and shipped CPU configs that decay within a shortened run."""
import math

import numpy as np
import pytest

from xpmodel.config import load_config
from xpmodel.errors import UsageError
from xpmodel.train.schedule import (SCHEDULES, ConstantSchedule, CosineSchedule, LinearSchedule,
                                    StepSchedule, WSDSchedule, schedule_from_config)

LR, MIN_LR = 1e-3, 1e-4


def test_every_schedule_shares_the_warmup():
    for schedule in (CosineSchedule(LR, MIN_LR, 10, 100), LinearSchedule(LR, MIN_LR, 10, 100),
                     StepSchedule(LR, MIN_LR, 10, 30, 0.5), WSDSchedule(LR, MIN_LR, 10, 100),
                     ConstantSchedule(LR, 10)):
        assert [schedule(s) for s in range(10)] == pytest.approx([LR * (s + 1) / 11 for s in range(10)])
        assert schedule(10) == pytest.approx(LR)


def test_linear_is_a_straight_line_to_min_lr():
    schedule = LinearSchedule(LR, MIN_LR, 10, 110)
    assert schedule(60) == pytest.approx((LR + MIN_LR) / 2)
    assert schedule(35) - schedule(36) == pytest.approx((LR - MIN_LR) / 100)
    assert schedule(110) == schedule(5000) == MIN_LR


def test_step_decay_multiplies_by_gamma_every_step_size_and_floors_at_min_lr():
    schedule = StepSchedule(1.0, 0.005, 0, 10, 0.1)
    assert [schedule(s) for s in (0, 9, 10, 19, 20, 29, 30, 1000)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005])
    torch_step_lr = StepSchedule(1.0, 0.0, 5, 3, 0.5)   # StepLR after a warmup when min_lr = 0
    assert [torch_step_lr(s) for s in range(5, 14)] == pytest.approx(
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


def test_wsd_holds_then_decays_over_the_last_fraction():
    schedule = WSDSchedule(LR, MIN_LR, 10, 100, decay_fraction=0.2)
    assert schedule.decay_start == 80
    assert all(schedule(s) == LR for s in range(10, 81))
    assert schedule(90) == pytest.approx((LR + MIN_LR) / 2)
    assert schedule(99) > MIN_LR and schedule(100) == MIN_LR
    # a decay longer than the span after warmup starts right after the warmup
    assert WSDSchedule(LR, MIN_LR, 10, 100, decay_fraction=1.0).decay_start == 10


def test_schedules_refuse_impossible_arguments():
    with pytest.raises(ValueError, match="gamma"):
        StepSchedule(LR, MIN_LR, 0, 10, 1.5)
    with pytest.raises(ValueError, match="step_size"):
        StepSchedule(LR, MIN_LR, 0, 0, 0.5)
    with pytest.raises(ValueError, match="decay_fraction"):
        WSDSchedule(LR, MIN_LR, 0, 100, decay_fraction=0)
    with pytest.raises(ValueError, match="min_lr"):
        LinearSchedule(LR, 2 * LR, 0, 100)


@pytest.mark.parametrize("build, message", [
    (lambda: ConstantSchedule(-1.0), "lr must be a finite number >= 0, got -1.0"),
    (lambda: ConstantSchedule(math.nan), "lr must be a finite number >= 0, got nan"),
    (lambda: ConstantSchedule(LR, -5), "warmup_iters must be an integer >= 0, got -5"),
    (lambda: CosineSchedule("1", 0, 1, 5), "lr must be a finite number >= 0, got '1'"),
    (lambda: CosineSchedule(math.inf, 0, 1, 5), "lr must be a finite number >= 0, got inf"),
    (lambda: CosineSchedule(1, None, 1, 5), "min_lr must be a finite number >= 0, got None"),
    (lambda: CosineSchedule(1, 0.1, 5, None), "decay_iters must be an integer >= 0, got None"),
    (lambda: LinearSchedule(1, 0.1, 2.5, 10), "warmup_iters must be an integer >= 0, got 2.5"),
    (lambda: StepSchedule(1, 0.1, 0, 10, "0.5"), "gamma must be a finite number in (0, 1], got '0.5'"),
    (lambda: StepSchedule(1, 0.1, 0, 1.5, 0.5), "step_size must be an integer > 0, got 1.5"),
    (lambda: WSDSchedule(1, 0.1, 0, 10, math.nan), "decay_fraction must be a finite number in (0, 1], got nan"),
])
def test_schedules_check_types_and_finiteness_naming_the_argument(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_schedules_take_numpy_scalars():
    schedule = CosineSchedule(np.float32(0.5), np.float64(0.25), np.int64(2), np.int32(10))
    assert schedule(np.int64(10)) == 0.25 and type(schedule.lr) is float and type(schedule.warmup_iters) is int


@pytest.mark.parametrize("name", SCHEDULES)
def test_config_names_every_schedule_and_it_ends_at_min_lr(name):
    config = load_config("default", [f"train.schedule={name}", "train.max_iters=300",
                                     "train.warmup_iters=30"])
    schedule = schedule_from_config(config.train, 300)
    lrs = [schedule(s) for s in range(300)]
    assert max(lrs) == pytest.approx(config.train.lr)
    if name == "constant":
        assert lrs[-1] == config.train.lr
    else:
        assert lrs[-1] - config.train.min_lr <= 0.02 * (config.train.lr - config.train.min_lr), name
        assert all(b <= a + 1e-15 for a, b in zip(lrs[30:], lrs[31:])), "decays monotonically"


def test_step_size_and_gamma_and_decay_fraction_from_the_config():
    config = load_config("default", ["train.schedule=step", "train.step_size=50", "train.gamma=0.5",
                                     "train.warmup_iters=0", "train.min_lr=0"])
    schedule = schedule_from_config(config.train, 700)
    assert (schedule(49), schedule(50), schedule(100)) == pytest.approx((3e-4, 1.5e-4, 7.5e-5))
    # step_size null: the rate drops after each third of the steps after warmup
    thirds = schedule_from_config(load_config("default", ["train.schedule=step",
                                                          "train.warmup_iters=100"]).train, 700)
    assert (thirds.warmup_iters, thirds.step_size) == (100, 200)
    wsd = schedule_from_config(load_config("default", ["train.schedule=wsd",
                                                       "train.decay_fraction=0.5"]).train, 700)
    assert wsd.decay_start == 350


@pytest.mark.parametrize("override, culprit", [
    ("train.schedule=exponential", "train.schedule must be one of cosine, constant, linear, step, wsd"),
    ("train.gamma=0", "train.gamma must be in (0, 1]"),
    ("train.gamma=2", "train.gamma must be in (0, 1]"),
    ("train.step_size=0", "train.step_size must be > 0"),
    ("train.decay_fraction=1.5", "train.decay_fraction must be in (0, 1]"),
])
def test_bad_schedule_settings_name_the_key(override, culprit):
    with pytest.raises(UsageError) as error:
        load_config("default", [override])
    assert culprit in str(error.value)


@pytest.mark.parametrize("name", ["default", "shakespeare-char-cpu", "llama-char-cpu"])
def test_shipped_cpu_configs_decay_within_a_shortened_run(name):
    config = load_config(name, ["train.max_iters=200", "train.warmup_iters=20"])
    assert config.train.lr_decay_iters is None
    schedule = schedule_from_config(config.train, config.train.max_iters)
    assert schedule(199) == pytest.approx(config.train.min_lr, rel=1e-3)
    assert schedule(100) < config.train.lr
    assert math.isclose(schedule(20), config.train.lr)


def test_a_warmup_longer_than_an_epoch_run_is_refused_before_writing(capsys, tmp_path):
    from pathlib import Path
    from cli_helpers import assert_one_line_error, run_cli, write_corpus
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    tiny = Path(__file__).parent / "tiny-run.yaml"
    args = ["train", "--config", tiny, f"data.source={corpus}", "train.max_iters=null",
            "train.epochs=1", "train.lr_decay_iters=100000"]
    code, _, err = run_cli(capsys, *args, "train.warmup_iters=100000", "--out", tmp_path / "long")
    assert code == 2 and not (tmp_path / "long").exists()
    assert_one_line_error(err)
    assert "train.warmup_iters (100000) is longer than the run (train.epochs = 1: " in err
    code, _, err = run_cli(capsys, *args, "train.warmup_iters=2", "--out", tmp_path / "short",
                           "--quiet")
    assert code == 0, err
