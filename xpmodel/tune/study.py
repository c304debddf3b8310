"""`xpmodel sweep --sampler tpe`: the sweep's trials drawn by Optuna's TPE
sampler and pruned by its median or successive-halving pruner, from the
validation losses the trials write to metrics.jsonl (the `tune` extra).

    SWEEP_DIR/study.db        the Optuna study (SQLite), unless --storage URL names another
    SWEEP_DIR/claims/         trial-NNN.lock: held (flock) by the sweep process running it;
                              left in place, it marks the trial as this folder's
                              (as does the trial's run directory)

Each trial is still an `xpmodel train` child with its own run directory,
SWEEP_DIR/trials/trial-NNN, NNN being the Optuna trial number of its first
attempt (a retry, below, is a trial of the study with a number of its own, so
the names skip the retries' numbers). The study is the state: any number of
`xpmodel sweep` processes given the same command (and the same --storage, on
several machines) ask it for trials until --trials of them exist. A trial left
running by a killed sweep (its claim lock is free) is taken up by the next
process started on the SWEEP_DIR that holds its claim file (or run directory),
and continued with `xpmodel train --resume`, its reported evaluations kept.

A failed trial stays failed in the study (Optuna's states are final): a sweep
started on the SWEEP_DIR that holds its claim file (or run directory) tries it
again as a new trial of the study with the same values, recorded as Optuna's
RetryFailedTrialCallback records a retry (system attributes failed_trial, the
first attempt's number, and retry_history), which keeps the first attempt's
name, run directory and log, so `xpmodel train --resume` continues it where it
saved a checkpoint. Only a name's last attempt counts toward --trials and is
listed in the results.
"""
import os
import socket
import time
import warnings
from pathlib import Path

import numpy

from ..config import load_config
from ..errors import UsageError, XpmodelError, quote
from ..files import try_exclusive_lock
from .sweep import MIN_FINISHED_TO_PRUNE, Sweep
from .sweep_plan import check_trial, grid_size, trial_overrides
from .sweep_state import trial_name

PRUNERS = ("median", "halving", "none")
_SKIPPED = "xpmodel_skipped"        # user attr of trials that are not trials: invalid or surplus


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError("--sampler tpe needs Optuna: pip install 'xpmodel[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class OptunaSweep(Sweep):
    """A Sweep whose trials come from an Optuna study (see the module's docstring)."""

    def __init__(self, out, config, specs, storage=None, pruner="median", **kwargs):
        if pruner not in PRUNERS:
            raise UsageError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
        self.optuna = import_optuna()
        self.storage_url = storage or \
            f"sqlite:///{(Path(out) / 'study.db').resolve()}"
        self.study_name = Path(out).resolve().name
        self.pruner_name = pruner
        super().__init__(out, config, specs, prune=pruner != "none", sampler="tpe", **kwargs)
        self.n_wanted = self.trials_wanted or self._default_trials()
        self.state["trials"] = []
        self._own = {}          # name -> trial dict of the trials this process runs
        self._optuna_trials = {}
        self._claims = {}       # name -> fd of its claim lock
        self.study = self._open_study()

    def run(self):
        try:
            return super().run()
        finally:
            self.close()

    ONE_PROCESS = False         # workers share the study; each claims its trials

    def close(self):
        """Let go of this process's worker slot and trial claims."""
        super().close()
        for fd in [self._claims.pop(name) for name in list(self._claims)] + \
                [getattr(self, "_worker_fd", None)]:
            if fd is not None:
                os.close(fd)
        self._worker_fd = None

    # ---- the study ---------------------------------------------------------------------
    def _extra_plan(self):
        return {"storage": self.storage_url} if not self.storage_url.startswith("sqlite:///") or \
            Path(self.storage_url[len("sqlite:///"):]).parent != self.dir.path.resolve() else {}

    def _plan_trials(self):
        return []               # the study draws them

    def _save(self):
        pass                    # the study holds the trials; sweep.json only the plan

    def _default_trials(self):
        if all(p.kind == "grid" for p in self.params):
            return grid_size(self.params)
        return 8

    def _open_study(self):
        optuna = self.optuna
        url = self.storage_url
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as exc:      # a bad URL, a missing driver, a refused connection
            raise XpmodelError(f"--storage {quote(url, 120)}: {str(exc).splitlines()[0]}") from None
        self._storage = storage
        study = optuna.create_study(storage=storage, study_name=self.study_name,
                                    direction="minimize", load_if_exists=True,
                                    sampler=self._sampler(storage), pruner=self._pruner())
        plan = self.state["plan"]
        known = study.user_attrs.get("xpmodel_plan")
        if known is None:
            study.set_user_attr("xpmodel_plan", plan)
        elif known != plan:
            changed = [k for k in plan if plan[k] != known.get(k)]
            raise UsageError(f"the study {self.study_name} in {url} was made by a sweep with other "
                             f"settings ({', '.join(changed)} differ); run the same command, or "
                             f"choose another --out")
        return study

    def _sampler(self, storage):
        # one seed per worker and per restart, so two processes (or a resumed one)
        # do not draw the same startup trials; a fresh single sweep is reproducible
        try:
            started = len(storage.get_all_trials(storage.get_study_id_from_name(self.study_name)))
        except KeyError:
            started = 0
        worker = self._worker_index()
        host = 0 if self.storage_url.startswith("sqlite") else \
            int.from_bytes(socket.gethostname().encode()[:8].ljust(8, b"\0"), "little")
        seed = int(numpy.random.SeedSequence([self.seed, worker, started, host])
                   .generate_state(1)[0])
        startup = min(10, max(3, self.n_wanted // 4))
        with warnings.catch_warnings():   # constant_liar is "experimental" before Optuna 4
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            return self.optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                                   constant_liar=True)

    def _worker_index(self):
        """The lowest free worker slot in SWEEP_DIR/claims (held until exit)."""
        folder = self.dir.path / "claims"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1000):
            fd = try_exclusive_lock(folder / f"worker-{index}.lock", create=True)
            if fd is not None:
                self._worker_fd = fd
                return index
        return os.getpid()

    def _pruner(self):
        pruners = self.optuna.pruners
        if self.pruner_name == "median":
            return pruners.MedianPruner(n_startup_trials=MIN_FINISHED_TO_PRUNE, n_warmup_steps=0,
                                        n_min_trials=MIN_FINISHED_TO_PRUNE)
        if self.pruner_name == "halving":
            first = load_config(self.config, self.fixed).train.eval_interval
            return pruners.SuccessiveHalvingPruner(min_resource=max(1, first), reduction_factor=3)
        return pruners.NopPruner()

    def _frozen(self):
        return self.study.get_trials(deepcopy=False)

    def _counted(self, frozen):
        """The trials that count toward --trials, in the order of their names:
        the last attempt of each name, none of those skipped."""
        latest = {}
        for trial in frozen:
            number = _first_attempt(trial)
            if not trial.user_attrs.get(_SKIPPED) and \
                    (number not in latest or trial.number > latest[number].number):
                latest[number] = trial
        return [latest[number] for number in sorted(latest)]

    # ---- choosing trials ---------------------------------------------------------------
    def _begin(self):
        state = self.optuna.trial.TrialState
        counted = self._counted(self._frozen())
        self._failed = [t for t in counted if t.state == state.FAIL and
                        self._ran_here(t)]      # tried again, as a grid sweep's
        done = [t for t in counted if t.state not in (state.RUNNING, state.WAITING)
                and t not in self._failed]
        if self.show and (done or self._failed):
            names = ", ".join(trial_name(_first_attempt(t)) for t in self._failed)
            retry = f"; retrying {len(self._failed)} failed: {names}" if self._failed else ""
            print(f"resuming the sweep in {self.dir.path}: {len(done)} of {self.n_wanted} trials "
                  f"done{retry}", flush=True)

    def _next_trial(self):
        orphan = self._adopt_orphan()
        if orphan is not None:
            return orphan
        while self._failed:
            retry = self._retry(self._failed.pop(0))
            if retry is not None:
                return retry
        for _ in range(200):
            counted = self._counted(self._frozen())
            waiting = any(t.state == self.optuna.trial.TrialState.WAITING for t in counted)
            if not waiting and len(counted) >= self.n_wanted:
                return None         # (a trial queued by enqueue_trial is still asked for)
            trial = self.study.ask()
            name = trial_name(trial.number)
            params = {p.key: self._suggest(trial, p) for p in self.params}
            earlier = [t for t in self._counted(self._frozen())
                       if _first_attempt(t) < trial.number]
            if len(earlier) >= self.n_wanted:       # another worker took the last one
                self._skip(trial, "surplus")
                return None
            try:
                check_trial(self.config, params, self.fixed)
            except UsageError as exc:
                self._skip(trial, f"invalid: {exc}")
                continue
            self._claims[name] = try_exclusive_lock(self._claim_path(name), create=True)
            for key, value in self._owner_attrs(params).items():
                trial.set_user_attr(key, value)
            return self._own_trial(trial, name, params, reported=())
        raise UsageError("200 trials in a row drew invalid configs; narrow the SPECs' ranges")

    def _owner_attrs(self, params):
        """The user attributes that tie a trial to this SWEEP_DIR and process."""
        return {"sweep_dir": str(self.dir.path.resolve()), "params": params,
                "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def _retry(self, failed):
        """A new trial of the study that tries the failed trial `failed` again
        under its name, or None when another process has since taken it."""
        name = trial_name(_first_attempt(failed))
        fd = try_exclusive_lock(self._claim_path(name), create=True)
        if fd is None:
            return None                   # another process is trying it again
        latest = next((t for t in self._counted(self._frozen())
                       if _first_attempt(t) == _first_attempt(failed)), None)
        if latest is None or latest.number != failed.number:
            os.close(fd)                  # tried again since this process started
            return None
        self._claims[name] = fd
        history = [*failed.system_attrs.get("retry_history", []), failed.number]
        params = failed.user_attrs.get("params", failed.params)
        attempt = self.optuna.trial.create_trial(
            state=self.optuna.trial.TrialState.RUNNING, params=failed.params,
            distributions=failed.distributions, user_attrs=self._owner_attrs(params),
            system_attrs={"failed_trial": history[0], "retry_history": history})
        trial_id = self._storage.create_new_trial(
            self._storage.get_study_id_from_name(self.study_name), template_trial=attempt)
        return self._own_trial(self.optuna.trial.Trial(self.study, trial_id), name, params,
                               reported=())

    def _suggest(self, trial, param):
        if param.kind == "grid":
            return trial.suggest_categorical(param.key, param.values)
        low, high = param.values
        if param.kind == "int":
            return trial.suggest_int(param.key, low, high)
        return trial.suggest_float(param.key, low, high, log=param.kind == "log")

    def _skip(self, trial, why):
        trial.set_user_attr(_SKIPPED, why)
        self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)

    def _adopt_orphan(self):
        """A running trial of this SWEEP_DIR that no live process holds."""
        for frozen in self._frozen():
            name = trial_name(_first_attempt(frozen))
            if frozen.state != self.optuna.trial.TrialState.RUNNING or name in self._own or \
                    not self._ran_here(frozen):
                continue
            fd = try_exclusive_lock(self._claim_path(name), create=True)
            if fd is None:
                continue                  # another process runs it
            if self._storage.get_trial(frozen._trial_id).state != \
                    self.optuna.trial.TrialState.RUNNING:
                os.close(fd)              # it finished since the list was read
                continue
            self._claims[name] = fd
            trial = self.optuna.trial.Trial(self.study, frozen._trial_id)
            return self._own_trial(trial, name, frozen.user_attrs.get("params", frozen.params),
                                   reported=frozen.intermediate_values)
        return None

    def _own_trial(self, trial, name, params, reported):
        record = {"name": name, "params": params, "status": "pending", "reported": set(reported),
                  "max_iters": load_config(self.config, trial_overrides(
                      self.config, params, self.fixed)).train.max_iters}
        self._own[name] = record
        self._optuna_trials[name] = trial
        return record

    def _claim_path(self, name):
        return self.dir.path / "claims" / f"{name}.lock"

    def _ran_here(self, trial):
        """Whether a process on this SWEEP_DIR claimed the trial: its sweep_dir
        attribute (set once the claim is held) is this folder's path, and this
        folder holds its claim file or its run directory. Machines sharing a
        --storage often give their --out the same path; the claim file, which
        no process makes for another's trial, and the run directory tell this
        machine's folder from the others' (either, should one be removed)."""
        name = trial_name(_first_attempt(trial))
        return trial.user_attrs.get("sweep_dir") == str(self.dir.path.resolve()) and \
            (self._claim_path(name).exists() or self.dir.trial_dir(name).exists())

    def _retried_here(self, failed):
        """Of the `failed` trials' names, those this folder ran (`_ran_here`):
        the others are another machine's, which a rerun here leaves alone."""
        latest = {trial_name(_first_attempt(t)): t for t in self._counted(self._frozen())}
        return [name for name in failed if name in latest and self._ran_here(latest[name])]

    # ---- reporting ---------------------------------------------------------------------
    def _should_prune(self, trial):
        """Report the trial's new evaluations; whether the pruner stops it at one."""
        optuna_trial = self._optuna_trials[trial["name"]]
        for step, value in self._report(trial):
            last = trial["max_iters"] is not None and step >= trial["max_iters"]
            if self.prune and not last and optuna_trial.should_prune():
                trial["pruned_at"] = f"step {step}: {value:.4f} ({self.pruner_name} pruner)"
                return True
        return False

    def _report(self, trial):
        """Each evaluation not yet reported, reported as it is yielded."""
        optuna_trial = self._optuna_trials[trial["name"]]
        for step, value in trial.get("evals", []):
            if step not in trial["reported"]:
                trial["reported"].add(step)
                optuna_trial.report(value, step)
                yield step, value

    def _ended(self, trial):
        name = trial["name"]
        for _ in self._report(trial):
            pass
        optuna_trial = self._optuna_trials[name]
        for key in ("step", "best_step", "wall_time_s", "pruned_at", "error"):
            if trial.get(key) is not None:
                optuna_trial.set_user_attr(key, trial[key])
        state = self.optuna.trial.TrialState
        if trial["status"] == "done" and trial.get("metric") is not None:
            self.study.tell(optuna_trial, trial["metric"])
        elif trial["status"] == "pruned":
            self.study.tell(optuna_trial, state=state.PRUNED)
        else:
            if trial["status"] == "done":
                optuna_trial.set_user_attr("error", f"no {self.metric} recorded")
            self.study.tell(optuna_trial, state=state.FAIL)
        fd = self._claims.pop(name, None)
        if fd is not None:
            os.close(fd)        # the file stays: unlinking a lock file races with its next taker

    # ---- results: every trial of the study, whichever process ran it -------------------
    def write_results(self):
        self.state["trials"] = self._trial_rows()
        return super().write_results()

    def table(self):
        self.state["trials"] = self._trial_rows()
        return super().table()

    def _trial_rows(self):
        rows = []
        state = self.optuna.trial.TrialState
        status = {state.COMPLETE: "done", state.PRUNED: "pruned", state.FAIL: "failed",
                  state.RUNNING: "running", state.WAITING: "pending"}
        for frozen in self._counted(self._frozen()):
            name = trial_name(_first_attempt(frozen))
            if name in self._own and self._own[name]["status"] in ("running", "pending"):
                rows.append(self._own[name])
                continue
            evals = sorted(frozen.intermediate_values.items())
            values = [v for _, v in evals]
            best = min(range(len(values)), key=values.__getitem__) if values else None
            wall = frozen.user_attrs.get("wall_time_s")
            rows.append({"name": name, "params": frozen.user_attrs.get("params", frozen.params),
                         "status": status.get(frozen.state, str(frozen.state)),
                         "evals": [list(e) for e in evals],
                         "metric": frozen.value if frozen.state == state.COMPLETE else
                         (values[best] if values else None),
                         "best_step": evals[best][0] if values else None,
                         "step": frozen.user_attrs.get("step", evals[-1][0] if evals else 0),
                         "wall_time_s": wall,
                         **({"error": frozen.user_attrs["error"]}
                            if "error" in frozen.user_attrs else {})})
        return rows

    def refresh_rows(self):
        """For the live table: the study's trials, read at most once a second."""
        if time.time() - getattr(self, "_rows_read", 0) >= 1:
            self._rows_read = time.time()
            self.state["trials"] = self._trial_rows()


def _first_attempt(trial):
    """The number of a trial's first attempt, which names it (trial-NNN): its
    own, or for an attempt that tries a failed trial again, the first's."""
    return trial.system_attrs.get("failed_trial", trial.number)
