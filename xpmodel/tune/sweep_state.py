"""A sweep's folder and its sweep.json, the plan and every trial's state.

sweep.json is rewritten atomically and checked whole when read back: each
value must have the type the sweep writes, and a trial's name, which its
run folder and log are named after, must be trial-NNN, so nothing read from
it leads outside the sweep folder.

A sweep killed while writing one of its files leaves that write's temporary
(`.NAME.tmp-PID`, atomic.py); `dead_temporaries` finds those whose writer is
gone, for the next sweep opened on the folder to remove.
"""
import re
from pathlib import Path

from ..atomic import atomic_write_json, dead_temporaries
from ..config import check_override
from ..errors import UsageError, XpmodelError, quote
from ..files import MAX_JSON_COUNT, finite_json_number, read_json
from ..train.rundir import SWEEP_STATE
from .sweep_plan import format_value

FORMAT = "xpmodel-sweep"
STATUSES = ("pending", "running", "done", "pruned", "failed")
_TRIAL_NAME = re.compile(r"trial-\d{3,}")
_MAX_STATE_BYTES = 16 << 20
# the files a sweep writes in its folder, each atomically
_OWN_FILES = (SWEEP_STATE, "results.json", "results.csv", "curves.png", "best.yaml")


class SweepDir:
    def __init__(self, path):
        self.path = Path(path)
        self.state_path = self.path / SWEEP_STATE

    def trial_dir(self, name):
        return self.path / "trials" / name

    def log_path(self, name):
        return self.path / "logs" / f"{name}.log"

    def load(self):
        """sweep.json, its whole structure checked (see `_check_state`), or None."""
        if not self.state_path.is_file():
            return None
        state = read_json(self.state_path, _MAX_STATE_BYTES, XpmodelError, "sweep state",
                          advice="; move it away to start the sweep again")
        if state.get("format") != FORMAT:
            raise XpmodelError(f"{self.state_path}: not an xpmodel sweep")
        problem = _state_problem(state)
        if problem is not None:
            raise XpmodelError(f"{self.state_path}: damaged ({problem}); move it away to start "
                               f"the sweep again")
        return state

    def save(self, state):
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, state)

    def dead_temporaries(self):
        """The temporary files of the sweep's own files (`.sweep.json.tmp-PID`...)
        whose writing process is gone (atomic.dead_temporaries): regular files only."""
        return [path for path, _ in dead_temporaries(self.path, _OWN_FILES.__contains__)
                if path.is_file()]


def trial_name(number):
    """The name of trial `number`, and of its run and log: trial-000, trial-001, ..."""
    return f"trial-{number:03d}"


def _state_problem(state):
    """What is wrong with a sweep.json document's structure, or None: each
    value the sweep reads back must have the type it writes, and a trial's
    name, which its run folder and log are named after, must be trial-NNN."""
    if state.get("version") != 1:
        return f"version {quote(state.get('version'), 40)} is not 1"
    if not isinstance(state.get("plan"), dict):
        return "plan is not a mapping"
    fixed = state.get("fixed")
    if not isinstance(fixed, list) or not all(isinstance(text, str) for text in fixed):
        return "fixed is not a list of KEY=VALUE strings"
    for text in fixed:
        problem = _override_problem(text)
        if problem is not None:
            return f"fixed {quote(text, 80)}: {problem}"
    trials = state.get("trials")
    if not isinstance(trials, list):
        return "trials is not a list"
    names = set()
    for index, trial in enumerate(trials):
        problem = _trial_problem(trial)
        if problem is None and trial["name"] in names:
            problem = "a second trial of this name"
        if problem is not None:
            name = trial.get("name") if isinstance(trial, dict) else None
            return f"trial {quote(name, 40) if name is not None else index}: {problem}"
        names.add(trial["name"])
    return None


def _is_step(value):
    return type(value) is int and 0 <= value <= MAX_JSON_COUNT


# A trial's fields besides name, params and status, each present or not:
# (whether a value is one the sweep writes, what it must be)
_TRIAL_FIELDS = {
    "step": (_is_step, "a step number"),
    "checked_step": (_is_step, "a step number"),
    "best_step": (lambda v: v is None or _is_step(v), "a step number or null"),
    "metric": (lambda v: v is None or finite_json_number(v), "a number or null"),
    "wall_time_s": (lambda v: v is None or finite_json_number(v), "a number or null"),
    "evals": (lambda v: isinstance(v, list) and all(
        isinstance(e, list) and len(e) == 2 and _is_step(e[0]) and finite_json_number(e[1]) for e in v),
              "a list of [step, value] pairs"),
    "pruned_at": (lambda v: isinstance(v, str), "text"),
    "error": (lambda v: isinstance(v, str), "text"),
}


def _trial_problem(trial):
    if not isinstance(trial, dict):
        return "not a mapping"
    name, params, status = trial.get("name"), trial.get("params"), trial.get("status")
    if not isinstance(name, str) or not _TRIAL_NAME.fullmatch(name):
        return f"the name {quote(name, 40)} is not trial-NNN"
    if status not in STATUSES:
        return f"status {quote(status, 40)} is not one of {', '.join(STATUSES)}"
    if not isinstance(params, dict):
        return "params is not a mapping of keys to values"
    for key, value in params.items():
        problem = _override_problem(f"{key}={format_value(value)}") if _is_param_value(value) else \
            "not a number, text, true/false or null"
        if problem is not None:
            return f"params {quote(key, 60)}: {problem}"
    for field, (valid, what) in _TRIAL_FIELDS.items():
        if field in trial and not valid(trial[field]):
            return f"{field} is not {what}"
    return None


def _is_param_value(value):
    """A value a SPEC gives a key: a scalar, or a list of them (for a list key)."""
    scalar = (bool, int, float, str, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and
                                         all(isinstance(item, scalar) for item in value))


def _override_problem(text):
    """Why KEY=VALUE is not an override of one config key, or None."""
    try:
        check_override(text)
    except UsageError as exc:
        return str(exc)
    return None
