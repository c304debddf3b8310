"""A sweep's SPECs (KEY=VALUES, as xpmodel/tune/sweep.py's docstring gives
them) and the trials they plan.

Every value is checked against its key when the SPEC is read, and every
planned trial against the whole config (draws that make an invalid config
are drawn again). When swept, train.lr carries train.min_lr along at the base
config's ratio (unless train.min_lr is swept too). The corpus, tokenizer
file and init_from every trial would read are checked before the sweep writes
anything (check_trial_inputs).
"""
import math
import os
import random
import typing
from dataclasses import dataclass

import numpy

from ..config import check_key, check_override, load_config
from ..config.load import setting_value
from ..config.sections import field_types, names_tokenizer_file
from ..data.sources import resolve_given
from ..errors import DataError, UsageError, quote, shown_path
from ..files import existing_file

_RESAMPLE_TRIES = 200
# A sweep's trials are listed in sweep.json and each trains a run: no sweep
# plans more than MAX_TRIALS. Grids of up to MAX_SHUFFLED combinations are put
# in a random order by a permutation of their indices (8 bytes each).
MAX_TRIALS = 100_000
MAX_SHUFFLED = 1_000_000


@dataclass
class Param:
    key: str
    kind: str              # grid, log, uniform, int
    values: list           # grid values, or [low, high]

    def draw(self, rng):
        low, high = self.values if self.kind != "grid" else (None, None)
        if self.kind == "log":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        if self.kind == "int":
            return int(rng.integers(low, high + 1))
        raise AssertionError(self.kind)


def parse_spec(text):
    """A Param from KEY=VALUES (see the module's docstring)."""
    key, sep, value = text.partition("=")
    if not sep or not key or "." not in key or not value:
        raise UsageError(f"SPEC {quote(text, 80)}: expected KEY=VALUES, e.g. train.lr=1e-4,3e-4 or "
                         f"train.lr=log:1e-5..1e-2")
    section, name = _spec_part(text, check_key, key)
    key = f"{section}.{name}"
    kind, _, body = value.partition(":") if value.split(":")[0] in ("log", "int") else ("", "", value)
    if ".." in body and (kind or _is_numeric(section, name)):   # a path's "../" is no range
        low_text, _, high_text = body.partition("..")
        try:
            low, high = (int(low_text), int(high_text)) if kind == "int" else \
                (float(low_text), float(high_text))
        except ValueError:
            raise UsageError(f"SPEC {quote(text, 80)}: the range {body} needs two "
                             f"{'integers' if kind == 'int' else 'numbers'}, LOW..HIGH") from None
        if not low < high or (kind == "log" and low <= 0):
            raise UsageError(f"SPEC {quote(text, 80)}: need {'0 < ' if kind == 'log' else ''}LOW < HIGH")
        return _checked(Param(key, kind or "uniform", [low, high]), text)
    if kind:
        raise UsageError(f"SPEC {quote(text, 80)}: {kind}: takes a range LOW..HIGH")
    values = [_spec_part(text, check_override, f"{key}={raw}")[1] for raw in body.split(",")]
    repeated = sorted({format_value(v) for v in values if values.count(v) > 1})
    if repeated:    # the same trial twice, as the same key twice among overrides is refused
        raise UsageError(f"SPEC {quote(text, 80)}: {', '.join(repeated)} given more than once")
    return _checked(Param(key, "grid", values), text)


def _is_numeric(section, name):
    """Whether the setting takes numbers (int or float, with or without null)."""
    annotation = field_types(section)[name]
    return any(kind in (int, float) for kind in typing.get_args(annotation) or (annotation,))


def _checked(param, text):
    """The Param, once each of its values (a range: both ends) suits its key alone,
    so `train.lr=abc,def` is refused before any trial; rules that relate several
    keys are checked per trial."""
    for value in param.values:
        _spec_part(text, check_override, f"{param.key}={format_value(value)}")
    return param


def _spec_part(text, check, *args):
    """check(*args), its UsageError naming the SPEC `text` it came from."""
    try:
        return check(*args)
    except UsageError as exc:
        raise UsageError(f"SPEC {quote(text, 80)}: {exc}") from None


def format_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def grid_size(params, n_trials=None):
    """The number of combinations of `params`' grid SPECs, refused in one line
    where the sweep would run them all (no --trials, no ranges) and they are
    more than MAX_TRIALS, as is a --trials of more."""
    count = math.prod(len(p.values) for p in params if p.kind == "grid")
    if n_trials is not None and n_trials > MAX_TRIALS:
        raise UsageError(f"--trials {n_trials:,}: a sweep plans at most {MAX_TRIALS:,} trials")
    if not n_trials and all(p.kind == "grid" for p in params) and count > MAX_TRIALS:
        raise UsageError(f"the SPECs make a grid of {count:,} combinations, more than the "
                         f"{MAX_TRIALS:,} trials a sweep plans; pass --trials N to run N of them "
                         f"(--sampler random draws them in a random order)")
    return count


def plan_trials(config_name, params, n_trials, seed, fixed=(), shuffle=False):
    """[{key: value}] for every trial, each checked to make a valid config;
    grid combinations in order, or drawn in a random order (shuffle, or any range).

    The combinations are counted, never listed: a trial's combination is
    decoded from its index (itertools.product's order), so six SPECs of 30
    values with --trials 2 plan two trials. A random order of at most
    MAX_SHUFFLED combinations is numpy's permutation of their indices; of more,
    Python's random.sample of them (a larger grid cannot be run whole anyway)."""
    grids = [p for p in params if p.kind == "grid"]
    ranges = [p for p in params if p.kind != "grid"]
    count = grid_size(params, n_trials)
    rng = numpy.random.default_rng(seed)
    wanted = count if not n_trials else min(n_trials, count)
    if not ranges:
        indices = _random_order(count, wanted, seed, rng) if shuffle else range(wanted)
        trials = [_combination(grids, int(i)) for i in indices]
        for trial in trials:
            check_trial(config_name, trial, fixed)
        return trials
    wanted = n_trials or 8
    order = _random_order(count, wanted, seed, rng)
    trials = []
    for i in range(wanted):
        base = _combination(grids, int(order[i % len(order)]))
        for _ in range(_RESAMPLE_TRIES):
            trial = dict(base, **{p.key: p.draw(rng) for p in ranges})
            try:
                check_trial(config_name, trial, fixed)
                break
            except UsageError:
                continue
        else:
            check_trial(config_name, trial, fixed)   # raises, naming the problem
        trials.append(trial)
    return trials


def _random_order(count, wanted, seed, rng):
    """min(wanted, count) distinct indices of `count` grid combinations, in a random order."""
    if count <= MAX_SHUFFLED:
        return rng.permutation(count)[:wanted]
    return random.Random(seed).sample(range(count), min(wanted, count))


def _combination(grids, index):
    """{key: value} of the grid combination at `index` in itertools.product's
    order of the grids' values (the last key changes fastest)."""
    values = {}
    for param in reversed(grids):
        index, at = divmod(index, len(param.values))
        values[param.key] = param.values[at]
    return {param.key: values[param.key] for param in grids}


def trial_overrides(config_name, params, fixed=()):
    """The KEY=VALUE list of a trial: the fixed ones, then its own (`searched_overrides`)."""
    return list(fixed) + searched_overrides(config_name, params, fixed)


def searched_overrides(config_name, params, fixed=()):
    """The KEY=VALUE list of what a trial searches: its values, and
    train.min_lr following train.lr at the base config's ratio (unless
    train.min_lr is searched too)."""
    overrides = [f"{k}={format_value(v)}" for k, v in params.items()]
    lr = params.get("train.lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and "train.min_lr" not in params:
        base = load_config(config_name, list(fixed)).train
        overrides.append(f"train.min_lr={format_value(params['train.lr'] * base.min_lr / base.lr)}")
    return overrides


def check_trial(config_name, params, fixed):
    try:
        load_config(config_name, trial_overrides(config_name, params, fixed))
    except UsageError as exc:
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
        raise UsageError(f"the trial {shown} is not a valid config: {exc}") from None


def check_trial_inputs(base, params):
    """Refuse, in one line naming it, an input every trial given it would fail
    on the same way, as `xpmodel train` would: a data.source that names
    nothing (exit 2) or is there but unusable, an empty folder say (bad data,
    exit 1); a data.tokenizer file that does not exist, unless the trials
    start from train.init_from (whose tokenizer they take); a train.init_from
    that does not exist. Each is `base`'s (the RunConfig with the fixed
    values) or each value a SPEC in `params` gives it."""
    for source in _trial_values(base, params, "data.source"):
        try:
            resolve_given(source, "data.source")
        except UsageError as exc:
            raise UsageError(f"{exc}; no trial could read it") from None
        except DataError as exc:   # there but unusable: bad data
            raise DataError(f"data.source {exc}; no trial could read it") from None
    starts_from = _trial_values(base, params, "train.init_from")
    for tokenizer in _trial_values(base, params, "data.tokenizer") if not any(starts_from) else ():
        if names_tokenizer_file(tokenizer):
            try:
                existing_file(tokenizer, "data.tokenizer", "tokenizer file")
            except UsageError as exc:
                raise UsageError(f"{exc}; no trial could read it") from None
    for init_from in starts_from:
        if init_from and not os.path.exists(init_from):
            raise UsageError(f"train.init_from {shown_path(init_from)}: no such directory; "
                             f"no trial could start from it")


def _trial_values(base, params, key):
    """The values trials give `key`: a SPEC's, or `base`'s."""
    swept = next((p for p in params if p.key == key), None)
    return swept.values if swept is not None else [setting_value(base, key)]
