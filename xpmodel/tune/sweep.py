"""`xpmodel sweep`: grid and random search over config keys, each trial an
ordinary run directory, resumable after any kill.

    SWEEP_DIR/
      sweep.json          the plan and every trial's state (rewritten atomically)
      trials/trial-NNN/   one run directory per trial (resume, sample, export as usual)
      logs/trial-NNN.log  what each trial's `xpmodel train` printed
      results.csv, results.json, curves.png, best.yaml   written as trials finish

A SPEC is KEY=VALUES:
    train.lr=1e-4,3e-4,1e-3     a grid (one value: fixed for every trial)
    train.lr=log:1e-5..1e-2     log-uniform        model.n_embd=int:128..512  integers
    train.grad_clip=0.5..2      uniform
With grids only, every combination is a trial (--trials caps them); with a
range, --trials trials (8) draw each range at random and cycle through the
grid combinations. Draws that make an invalid config (n_embd not divisible by
n_head, say) are drawn again. The plan is fixed when the sweep starts (from
--seed), so a resumed sweep runs the same trials.

Each trial is `xpmodel train` in a child process (`--resume` when its run
directory already holds a run of the values the trial searches and its
train.max_iters; a run made there with others fails the trial, naming the
value), K at once with --parallel K (CPU threads split among them, or one GPU
each with --device cuda). A child gets SIGTERM if the sweep dies, even by
kill -9, so it saves a checkpoint and stops; running the same command again
finishes what is left: finished trials are not rerun, an interrupted one
resumes.

Pruning (median rule, as Optuna's MedianPruner): at each evaluation of a
running trial, once at least 2 trials have finished, a trial whose validation
loss is above the median of the finished trials' at that step is stopped and
marked pruned. --no-prune turns it off.

--sampler grid (every combination; the default with lists only) or random (the
default with a range) is the plan above; --sampler tpe asks an Optuna study
instead (xpmodel/tune/study.py), with Optuna's median or successive-halving
pruner (--pruner). preset.py chooses between them (open_sweep) and chains
sweeps (--preset tuning-order).

When swept, train.lr carries train.min_lr along at the base config's ratio
(unless train.min_lr is swept too), so min_lr never exceeds lr.
"""
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import numpy

from ..atomic import is_temporary_name
from ..config import load_config, load_config_and_files
from ..config.load import setting_value
from ..cpu_threads import thread_count
from ..errors import UsageError, XpmodelError, quote, setting_text
from ..files import finite_json_number
from ..train.checkpoint import step_of_name
from ..train.outputs import check_holds_no_input
from ..train.rundir import LOCK_NAME, RunDir
from ..train.runlock import RunLock, lock_is_free
from ..train.runs import SHAPE_KEYS
from ..train.setup import absolute_init_from, absolute_source, absolute_tokenizer
from .compare import format_table, summarize
from .sweep_plan import (check_trial_inputs, format_value, grid_size, parse_spec, plan_trials,
                         searched_overrides, trial_overrides)
from .sweep_results import LiveTable, metric_text, params_text, trial_table, write_results
from .sweep_state import FORMAT, SweepDir, trial_name

METRICS = ("val_loss", "train_loss")
MIN_FINISHED_TO_PRUNE = 2
_POLL_S = 0.2
# The settings `xpmodel train` takes from train.init_from's source, when it is
# set, in place of the config's (runs.adopt_pretrained; block_size with its caveat)
_FROM_INIT_FROM = ("data.tokenizer", "data.vocab_size", "model.vocab_size",
                   *(f"model.{key}" for key in SHAPE_KEYS))


class Sweep:
    """One sweep: plan (or reload) its trials, run them, write its results."""

    def __init__(self, out, config, specs, trials=None, max_iters=None, parallel=1,
                 metric="val_loss", device="cpu", seed=0, prune=True, show=True, largest=None,
                 sampler=None):
        if metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        if trials is not None and trials < 1:
            raise UsageError(f"--trials must be at least 1, got {trials}")
        if max_iters is not None and max_iters < 1:
            raise UsageError(f"--max-iters must be at least 1, got {max_iters}")
        self.dir = SweepDir(out)
        self.config = str(config)
        self.parallel, self.device, self.prune, self.show = parallel, device, prune, show
        self.largest = largest   # a key: the winner is the finished trial with its largest value
        params = [parse_spec(s) for s in specs]
        keys = [p.key for p in params]
        repeated = list(dict.fromkeys(key for key in keys if keys.count(key) > 1))
        if repeated:
            raise UsageError(f"the SPECs give {', '.join(repeated)} more than once; one SPEC per key")
        fixed = [f"train.max_iters={max_iters}"] if max_iters is not None else []
        fixed += [f"{p.key}={format_value(p.values[0])}" for p in params     # one value: fixed
                  if p.kind == "grid" and len(p.values) == 1]
        params = [p for p in params if not (p.kind == "grid" and len(p.values) == 1)]
        if not params:
            raise UsageError("no SPEC searches anything: give several values (a,b,c) or a range "
                             "(log:LOW..HIGH, int:LOW..HIGH, LOW..HIGH)")
        natural = "grid" if all(p.kind == "grid" for p in params) else "random"
        if sampler == "grid" and natural != "grid":
            ranged = next(p.key for p in params if p.kind != "grid")
            raise UsageError(f"--sampler grid: {ranged} is a range; give it a list of values, or "
                             f"use --sampler random or tpe")
        self.sampler = sampler or natural
        grid_size(params, trials)       # a grid too large to run whole is refused before writing
        base, files = load_config_and_files(self.config, fixed)
        check_holds_no_input(self.dir.path, "--out", files)
        check_trial_inputs(base, params)   # and inputs no trial can use
        self.params, self.fixed, self.trials_wanted, self.seed = params, fixed, trials, seed
        plan = {"config": self.config, "specs": list(specs), "trials": trials,
                "max_iters": max_iters, "metric": metric, "seed": seed}
        if self.sampler != natural:     # sweeps made before --sampler keep their plan
            plan["sampler"] = self.sampler
        plan.update(self._extra_plan())
        self._lock = _SweepLock(RunDir(self.dir.path), "--out").__enter__() \
            if self.ONE_PROCESS else None
        try:
            self.state = self._open_state(out, plan, fixed)
        except BaseException:
            Sweep.close(self)
            raise
        self.metric = metric

    # A grid or random sweep's plan lives in sweep.json, written by one process:
    # it holds SWEEP_DIR's lock (train's run lock, SWEEP_DIR/.xpmodel.lock) from
    # here until run() ends. An Optuna sweep shares its study among processes.
    ONE_PROCESS = True

    def close(self):
        """Let go of the sweep folder's lock (run() does when it ends)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _open_state(self, out, plan, fixed):
        state = self._load_state()
        if state is None and self._others():
            raise UsageError(f"--out {out}: exists and is not a sweep; choose another --out")
        for path in self.dir.dead_temporaries():     # left by a sweep killed mid-write
            path.unlink(missing_ok=True)
        if state is not None and state["plan"] == plan:
            return state
        replaced = None         # the settings of a never-started plan this one replaces
        if state is not None:
            replaced = ", ".join(k for k in {**state["plan"], **plan}
                                 if plan.get(k) != state["plan"].get(k))
            if not self._never_started(state):
                raise UsageError(f"--out {out}: holds a sweep with other settings ({replaced} "
                                 f"differ); run the same command to resume it, or choose another --out")
        if self.dir.path.exists() and not self.dir.path.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory; choose another --out")
        planned = self._plan_trials()
        state = {"format": FORMAT, "version": 1, "plan": plan, "fixed": fixed,
                 "trials": [{"name": trial_name(i), "params": p, "status": "pending"}
                            for i, p in enumerate(planned)]}
        self.dir.save(state)
        if replaced is not None and self.show:
            print(f"--out {out}: no trial of the sweep there had started; planned it again with "
                  f"these settings ({replaced} differed)", flush=True)
        return state

    def _never_started(self, state):
        """Whether the sweep folder holds a plan and nothing else (its lock
        aside): no trial ever started, so a sweep with other settings may
        replace that plan. Only this process writes it (ONE_PROCESS)."""
        return self.ONE_PROCESS and all(t["status"] == "pending" for t in state["trials"]) and \
            all(p.name in (LOCK_NAME, self.dir.state_path.name) for p in self.dir.path.iterdir())

    def _others(self):
        """What the sweep folder holds besides what a sweep killed while creating
        it leaves: its lock, which no live process holds (this one, for a grid
        or random sweep, holds it now), and the temporaries of dead writers."""
        if not self.dir.path.is_dir():
            return []
        leftovers = {path.name for path in self.dir.dead_temporaries()}
        if self._lock is not None or lock_is_free(self.dir.path / LOCK_NAME):
            leftovers.add(LOCK_NAME)
        return [p for p in self.dir.path.iterdir() if p.name not in leftovers]

    def _load_state(self):
        """sweep.json, waiting a moment for another worker that is creating it."""
        for _ in range(20):
            state = self.dir.load()
            others = self._others()
            if state is not None or not others or not all(is_temporary_name(p.name) for p in others):
                return state
            time.sleep(0.1)
        return self.dir.load()

    def _extra_plan(self):
        return {}

    def _plan_trials(self):
        return plan_trials(self.config, self.params, self.trials_wanted, self.seed, self.fixed,
                           shuffle=self.sampler == "random")

    # ---- running ---------------------------------------------------------------------
    def run(self):
        """Run every trial not yet done (failed ones again); returns the results (as
        results.json holds them). Raises XpmodelError when no trial succeeded."""
        try:
            results = self._run()
        finally:
            self.close()
        self._check_outcome()
        return results

    def _run(self):
        self._begin()
        running = {}    # name -> (Popen, trial, slot, log file)
        slots = list(range(self.parallel))
        live = LiveTable(self) if self.show else None
        try:
            with live or contextlib.nullcontext():
                while True:
                    while slots:
                        trial = self._next_trial()
                        if trial is None:
                            break
                        slot = slots.pop(0)
                        started = self._start(trial, slot)
                        if started is None:       # refused before it started: failed
                            slots.append(slot)
                            continue
                        running[trial["name"]] = started
                    if not running:
                        break
                    time.sleep(_POLL_S)
                    for name, (process, trial, slot, log) in list(running.items()):
                        self._read_progress(trial)
                        code = process.poll()
                        if code is None and self._should_prune(trial):
                            process.send_signal(signal.SIGTERM)
                            process.wait()
                            code = "pruned"
                        if code is None:
                            continue
                        log.close()
                        del running[name]
                        slots.append(slot)
                        self._finish(trial, code)
                    if live:
                        live.refresh()
        finally:
            for process, *_ in running.values():   # an exception here: stop the children
                process.send_signal(signal.SIGTERM)
            for process, *_ in running.values():
                process.wait()
        return self.write_results()

    def _begin(self):
        trials = self.state["trials"]
        failed = [t for t in trials if t["status"] == "failed"]
        for trial in failed:            # a rerun retries them (resuming those that saved)
            trial["status"] = "pending"
            trial.pop("error", None)
        self._todo = [t for t in trials if t["status"] in ("pending", "running")]
        if self.show and len(self._todo) < len(trials) + len(failed):
            retry = f"; retrying {len(failed)} failed: {', '.join(t['name'] for t in failed)}" \
                if failed else ""
            print(f"resuming the sweep in {self.dir.path}: {len(trials) - len(self._todo)} of "
                  f"{len(trials)} trials done{retry}", flush=True)

    def _check_outcome(self):
        """Raise when the sweep ended with no trial done (and none left to run
        elsewhere); say how to retry the failed ones."""
        trials = self.state["trials"]
        failed = [t["name"] for t in trials if t["status"] == "failed"]
        if any(t["status"] in ("done", "running", "pending") for t in trials) or not trials:
            if failed and self.show:
                print(f"{len(failed)} of {len(trials)} trials failed (see {self.dir.path / 'logs'}); "
                      f"{self._retry_advice(failed)}", flush=True)
            return
        if self.show:
            print("\n".join(self.table()), flush=True)
        raise XpmodelError(f"no trial of the sweep in {self.dir.path} succeeded ({len(failed)} of "
                           f"{len(trials)} failed; see {self.dir.path / 'logs'}); "
                           f"{self._retry_advice(failed)}")

    def _retry_advice(self, failed):
        """How the `failed` trials are tried again: by a rerun here, for those
        a rerun here retries (`_retried_here`); by one in the folder that ran
        them, for those of another machine sharing an Optuna study."""
        elsewhere = len(failed) - len(self._retried_here(failed))
        here = "run the same command again to retry them"
        if not elsewhere:
            return here
        there = (f"{elsewhere} of them ran in another sweep folder sharing the study, where the "
                 f"same command retries {'it' if elsewhere == 1 else 'them'}")
        return there if elsewhere == len(failed) else f"{here}; {there}"

    def _retried_here(self, failed):
        """Those of the `failed` trials' names that a rerun in this folder
        retries: all of a sweep whose trials are all its own."""
        return list(failed)

    def _next_trial(self):
        """The next trial to start, or None when none is left."""
        return self._todo.pop(0) if self._todo else None

    def _save(self):
        self.dir.save(self.state)

    def refresh_rows(self):
        """Bring state["trials"] up to date for the live table (it always is here)."""

    def _start(self, trial, slot):
        """(process, trial, slot, log file) of the trial's `xpmodel train` child,
        or None when the run in its folder is not the trial's (`_other_run`):
        the trial has then failed, saying so."""
        name = trial["name"]
        run = RunDir(self.dir.trial_dir(name))
        log_path = self.dir.log_path(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "xpmodel", "train", "--quiet"]
        started = "started"
        if run.is_run():
            other = self._other_run(trial, run)
            if other is not None:
                return self._refuse(trial, other)
            _wait_for_lock(run)   # a trial of a killed sweep still saving
            command += ["--resume", str(run.path)]
            started = _resumed_at(run)
        else:
            run.path.parent.mkdir(parents=True, exist_ok=True)
            command += ["--config", self.config, "--out", str(run.path),
                        *trial_overrides(self.config, trial["params"], self.state["fixed"])]
        env = dict(os.environ)
        device = self.device
        if device.startswith("cuda") and self.parallel > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
            device = "cuda"
        else:
            env["XPMODEL_NUM_THREADS"] = str(max(1, thread_count() // self.parallel))
        command += ["--device", device]
        log = open(log_path, "a")
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # a session of its own: a Ctrl-C at the terminal reaches the sweep alone, whose
        # one SIGTERM then has the trial save (a second signal would stop it unsaved)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent, start_new_session=True)
        trial["status"] = "running"
        trial.setdefault("step", 0)
        self._save()
        self._say(f"{name} {started}: {params_text(trial['params'])} (log: {log_path})")
        return process, trial, slot, log

    def _other_run(self, trial, run):
        """None when the run in the trial's folder was started with the values
        the trial searches (`searched_overrides`: its params, and train.min_lr
        where it follows train.lr) and the trial's train.max_iters: the trial
        of a sweep killed while it ran, to resume. Else why it is not the
        trial's, naming the folder and the first value that differs: a run
        someone made there by hand is never taken for the trial's result.
        The sweep's fixed values are not compared, nor a searched one that
        train takes from train.init_from's source (_FROM_INIT_FROM): train
        keeps them otherwise than given (the source's model shape, say)."""
        fixed = self.state["fixed"]
        wanted = load_config(self.config, trial_overrides(self.config, trial["params"], fixed))
        try:
            held = run.load_config()
        except XpmodelError as exc:
            return f"{run.path}: holds a run whose config cannot be read ({exc}); move it away"
        searched = [o.partition("=")[0] for o in searched_overrides(self.config, trial["params"],
                                                                   fixed)]
        for key in dict.fromkeys(searched + ["train.max_iters"]):
            if wanted.train.init_from and key in _FROM_INIT_FROM:
                continue
            value, kept = _as_a_run_keeps(wanted, key), setting_value(held, key)
            if value != kept:
                return (f"{run.path}: holds a run made with {key}={_value_text(kept)}, not "
                        f"{trial['name']}'s {_value_text(value)}; the sweep does not take it for "
                        f"the trial's: move it away and run the sweep again")
        return None

    def _refuse(self, trial, error):
        """Fail a trial that was not started, `error` also in its log; None."""
        with open(self.dir.log_path(trial["name"]), "a") as log:
            log.write(f"error: {error}\n")
        self._fail(trial, error)
        self._close_trial(trial)
        return None

    def _read_progress(self, trial):
        """The trial's step, evaluations and best metric from its metrics.jsonl."""
        run = RunDir(self.dir.trial_dir(trial["name"]))
        records = run.read_metrics(warn=lambda text: None) if run.is_run() else []
        steps = [r["step"] for r in records if r.get("type") == "train"]
        evals = [r for r in records if r.get("type") == "eval"]
        trial["step"] = steps[-1] if steps else 0
        trial["evals"] = [[r["step"], r[self.metric]] for r in evals
                          if finite_json_number(r.get(self.metric))]
        values = [v for _, v in trial["evals"]]
        trial["metric"] = min(values) if values else None
        trial["best_step"] = trial["evals"][values.index(min(values))][0] if values else None
        trial["wall_time_s"] = next((r["time"] for r in reversed(records)
                                     if r.get("type") == "train" and finite_json_number(r.get("time"))),
                                    None)

    def _should_prune(self, trial):
        """Whether an evaluation of the running trial since the last look is worse
        than the median of the finished trials' at the same step."""
        if not self.prune:
            return False
        checked = trial.get("checked_step", 0)
        trial["checked_step"] = trial["evals"][-1][0] if trial.get("evals") else checked
        max_iters = load_config(self.config, trial_overrides(
            self.config, trial["params"], self.state["fixed"])).train.max_iters
        finished = [dict(map(tuple, t.get("evals", []))) for t in self.state["trials"]
                    if t["status"] == "done"]
        for step, value in trial.get("evals", []):
            if step <= checked or (max_iters is not None and step >= max_iters):
                continue          # seen already, or its last evaluation: let it finish
            others = [f[step] for f in finished if f.get(step) is not None]
            if len(others) < MIN_FINISHED_TO_PRUNE:
                continue
            median = float(numpy.median(others))
            if value > median:
                trial["pruned_at"] = f"step {step}: {value:.4f} > median {median:.4f} of {len(others)}"
                return True
        return False

    def _finish(self, trial, code):
        self._read_progress(trial)
        if code == "pruned":
            trial["status"] = "pruned"
            self._say(f"{trial['name']} pruned at {trial['pruned_at']}")
        elif code == 0:
            trial["status"] = "done"
            # to its final save, after the last evaluation, as `xpmodel runs` counts it
            trial["wall_time_s"] = summarize(RunDir(self.dir.trial_dir(trial["name"])))["wall_time_s"]
            self._say(f"{trial['name']} done: {self.metric} {metric_text(trial['metric'])}")
        elif code in (-signal.SIGTERM, 143, -signal.SIGINT, 130):
            trial["status"] = "running"       # stopped from outside: resumes next time
            self._save()
            raise KeyboardInterrupt
        else:
            self._fail(trial, _last_error(self.dir.log_path(trial["name"])))
        self._close_trial(trial)

    def _fail(self, trial, error):
        trial["status"] = "failed"
        trial["error"] = error
        self._say(f"{trial['name']} failed: {error}")

    def _close_trial(self, trial):
        """Record the trial's final status (done, pruned or failed)."""
        self._ended(trial)
        self._save()
        self.write_results()

    def _ended(self, trial):
        """A trial reached its final status (done, pruned or failed)."""

    def _say(self, text):
        if self.show and not sys.stdout.isatty():
            print(text, flush=True)

    # ---- results -----------------------------------------------------------------------
    def write_results(self):
        """results.csv, results.json, curves.png (with matplotlib) and best.yaml."""
        return write_results(self.dir.path, self.state, self.metric, self.config, self.largest)

    def table(self):
        return format_table(*trial_table(self.state["trials"], self.metric))


def _last_error(log_path):
    try:
        lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    errors = [l for l in lines if l.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


class _SweepLock(RunLock):
    """train's one-writer lock (train/rundir.py), taken on a sweep folder."""

    folder_name = "the sweep folder"

    def _in_use(self, holder):
        who = f" (pid {quote(holder.get('pid'), 20)} on {quote(holder.get('host'), 80)})" \
            if holder else ""
        return (f"{self.flag} {self.run.path}: in use by another xpmodel sweep{who}; one process "
                f"runs a grid or random sweep at a time: wait for it to finish or stop it first")


def _as_a_run_keeps(config, key):
    """config's value of `key` as `xpmodel train` writes it in the run's
    config.yaml: data.source and a tokenizer file's path made absolute,
    train.init_from resolved to an absolute path (links followed)."""
    value = setting_value(config, key)
    if key == "data.source":
        return absolute_source(value)
    if key == "data.tokenizer":
        return absolute_tokenizer(value)
    return absolute_init_from(value) if key == "train.init_from" else value


def _value_text(value):
    return quote(value, 80) if isinstance(value, str) else setting_text(value)


def _resumed_at(run):
    """'resumed at step N': N is the step of the run's newest readable checkpoint,
    the one `xpmodel train --resume` starts from (its log says which it took)."""
    path, _ = run.latest_checkpoint()
    return "resumed" if path is None else f"resumed at step {step_of_name(path.name)}"


def _wait_for_lock(run, timeout_s=120):
    """Until nobody holds the RunDir's lock (or timeout_s): a trial whose sweep
    was killed gets SIGTERM and saves a checkpoint before it lets go."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and run.is_locked():
        time.sleep(0.1)


def _die_with_parent():
    """In the child: SIGTERM when the sweep process dies (Linux), so a trial
    saves a checkpoint and stops instead of running on unwatched."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
