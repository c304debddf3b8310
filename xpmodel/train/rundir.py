"""The run directory: everything needed to resume, sample or evaluate a run.

    RUN_DIR/
      run.json                    marks the folder as an xpmodel run
      config.yaml                 the effective config
      tokenizer.json              the tokenizer the run trains with
      metrics.jsonl               one JSON object per logged step or evaluation
      checkpoints/step-NNNNNNNN.safetensors   the last `keep_last` good saves (9+ digits
                                              from step 10**8)
      checkpoints/best.safetensors            the best validation loss so far
      .xpmodel.lock               held by the one process writing the run
      tensorboard/, wandb/run-id  train.log_to's mirrors (train/mirrors.py)

Paths are all built here from fixed names, never from the contents of a
run's files, so nothing read from a run can point outside it; a checkpoint
that is a link to somewhere outside the run is ignored. A checkpoints/,
tensorboard/ or wandb/ that is itself a link (to another run's checkpoints,
say) is a folder the run does not own: a run is not started, resumed or
replaced through it, and nothing is listed for deletion or pruned in it.

Only files with these names (and xpmodel's temporaries of them whose writer
is gone) are ever deleted (tensorboard/'s event files never are: a restarted
run purges their steps instead): --overwrite and a failed start leave a
user's other files alone, and a folder that holds such names without being a
run is never written to.
Pruning old checkpoints is narrower still: it deletes only regular files
whose header reads as an xpmodel checkpoint of the run's own data.* and
model.* settings, never a link, a folder, a checkpoint copied from another
run, or a file of that name that someone else made. A resume skips such a
copied checkpoint as it skips a damaged one.

One writer per run: `RunDir.lock` takes an exclusive lock on .xpmodel.lock
(train/runlock.py).

run.json is written last when a run is created, after its step-0
checkpoint, so any folder with a run.json holds a checkpoint to resume from.
A folder without run.json whose lock file was left by a dead process is a
creation that was cut short; the next start takes it over without --overwrite.
"""
import difflib
import os
import re
import stat
import time
from contextlib import ExitStack
from pathlib import Path

from ..atomic import atomic_write_json, dead_temporaries, staged_writes, temporary_target
from ..config import config_to_dict, load_config, save_config
from ..errors import UsageError, XpmodelError, quote
from ..files import file_kind, inside, read_json
from ..interrupts import deferred_signals
from ..model.config import unused_options
from ..tokenizer.bpe import BPETokenizer
from .checkpoint import (FORMAT_VERSION, CheckpointError, names_itself_a_checkpoint,
                         read_checkpoint_header, step_file_name, step_of_name)
from .metrics_file import append_record, read_records, truncate_records
from .runlock import (RunLock, held_lock, holder_text, lock_file_problem, lock_holder,
                      lock_is_free)

RUN_FORMAT = "xpmodel-run"
LOCK_NAME = ".xpmodel.lock"
_CHECKPOINT_FILE = re.compile(r"^(step-\d{8,}|best)\.safetensors$")
_TOP_FILES = ("run.json", "config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png",
              "loss-health.png")
_WANDB_ID = ("wandb", "run-id")
_TENSORBOARD = "tensorboard"
# What marks a sweep's folder, whose trials are the runs (tune/sweep_state.py takes it here)
SWEEP_STATE = "sweep.json"
_MAX_MARKER_BYTES = 1 << 16


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    # ---- the fixed layout -------------------------------------------------------
    @property
    def marker(self):
        return self.path / "run.json"

    @property
    def config_path(self):
        return self.path / "config.yaml"

    @property
    def tokenizer_path(self):
        return self.path / "tokenizer.json"

    @property
    def metrics_path(self):
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self):
        return self.path / "checkpoints"

    @property
    def best_path(self):
        return self.checkpoint_dir / "best.safetensors"

    @property
    def lock_path(self):
        return self.path / LOCK_NAME

    @property
    def wandb_id_path(self):
        return self.path.joinpath(*_WANDB_ID)

    @property
    def tensorboard_dir(self):
        return self.path / _TENSORBOARD

    @property
    def _written_folders(self):
        """The folders a run writes files inside."""
        return self.checkpoint_dir, self.tensorboard_dir, self.wandb_id_path.parent

    def step_path(self, step):
        return self.checkpoint_dir / step_file_name(step)

    def _owns_checkpoint_dir(self):
        """checkpoints/ is a folder here, not a link to one elsewhere."""
        return self.checkpoint_dir.is_dir() and not self.checkpoint_dir.is_symlink()

    def check_folders_owned(self, flag):
        """Refuse (one line naming it) a checkpoints/, tensorboard/ or wandb/
        that is a link, or a checkpoints/ that is not a folder: the run would
        write, list and prune inside a folder it does not own."""
        for folder in self._written_folders:
            if folder.is_symlink():
                try:
                    target = f" (to {quote(os.readlink(folder), 200)})"
                except OSError:
                    target = ""
                raise UsageError(f"{flag} {self.path}: {folder} is a link{target}, a folder this "
                                 f"run does not own; xpmodel will not write, list or delete "
                                 f"through it: make {folder.name}/ a folder of the run's own")
        if _present(self.checkpoint_dir) and not self.checkpoint_dir.is_dir():
            raise UsageError(f"{flag} {self.path}: {self.checkpoint_dir} is not a folder; move it "
                             f"away so the run can keep its checkpoints there")

    # ---- which files are xpmodel's ----------------------------------------------
    def _layout_files(self):
        """Files present that bear the name of a file xpmodel writes in a run."""
        found = [self.path / name for name in _TOP_FILES if _present(self.path / name)]
        if _present(self.wandb_id_path) and not self.wandb_id_path.parent.is_symlink():
            found.append(self.wandb_id_path)
        if self._owns_checkpoint_dir():
            found += sorted(p for p in self.checkpoint_dir.iterdir() if _CHECKPOINT_FILE.match(p.name))
        return found

    def _own_temporaries(self, only_dead=False):
        """xpmodel's temporary files for the run's files, e.g. `.config.yaml.tmp-PID`;
        with only_dead, just those whose writer is gone (atomic.dead_temporaries):
        a live writer's, such as `plot`'s `.loss.png.tmp-PID`, is not the run's."""
        found = []
        for folder, names in ((self.path, lambda n: n in _TOP_FILES),
                              (self.checkpoint_dir, _CHECKPOINT_FILE.match),
                              (self.wandb_id_path.parent, lambda n: n == _WANDB_ID[1])):
            if not folder.is_dir() or (folder != self.path and folder.is_symlink()):
                continue
            if only_dead:
                found += [folder / path.name for path, _ in dead_temporaries(folder, names)]
                continue
            for path in folder.iterdir():
                temporary = temporary_target(path.name)
                if temporary is not None and names(temporary[0]):
                    found.append(path)
        return found

    def _other_entries(self):
        """What the folder holds besides a run's files: the user's own."""
        ours = set(self._layout_files()) | set(self._own_temporaries())
        ours |= {self.lock_path, self.checkpoint_dir}
        other = [p for p in self.path.iterdir() if p not in ours] if self.path.is_dir() else []
        if self._owns_checkpoint_dir():
            other += [p for p in self.checkpoint_dir.iterdir() if p not in ours]
        return other

    # ---- creating and opening ---------------------------------------------------
    def is_run(self):
        return self.marker.is_file()

    def is_locked(self):
        """Whether a live process holds this run's lock (it is training or being written)."""
        return self.lock_path.exists() and not lock_is_free(self.lock_path)

    def refuse_if_being_written(self, flag="RUN_DIR"):
        """Refuse (one line naming the writer) a run whose lock another live
        process holds, for a reader that found the run's files missing or
        unusable: the run is being created, or replaced with --overwrite.
        Only reads the lock file (a reader writes nothing into the run)."""
        if not _present(self.lock_path) or held_lock(self.path) is not None:
            return
        holder = lock_holder(self.lock_path)
        if holder is not None:
            raise UsageError(f"{flag} {self.path}: being written by {holder_text(holder)}; wait "
                             f"for it to finish")

    def lock_problem(self):
        """None, or why the entry named like the run's lock file is not one
        xpmodel made (a link, a FIFO...), naming it: writers refuse such a run."""
        problem = lock_file_problem(self.lock_path)
        return None if problem is None else (f"{self.lock_path}: {problem}, not a lock file "
                                             f"xpmodel made; move it away")

    def lock(self, flag="--out"):
        """The one-writer lock of this run directory, as a context manager
        (re-entrant within a process); creates the folder if needed, and
        removes the folders it created if they are empty when released.
        Refuses a run whose checkpoints/ (or another folder it writes in) is a
        link: see `check_folders_owned`."""
        self.check_folders_owned(flag)
        return RunLock(self, flag)

    def check_can_create(self, overwrite=False, resumable=True):
        """Raise UsageError unless `create` may start a run here; cheap, so it
        runs before any slow work. resumable: a run already here could be
        continued with `train --resume` instead (the message says so)."""
        if _present(self.path) and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        if not self.path.is_dir():
            return
        self.check_folders_owned("--out")
        if self.is_run():
            if not overwrite:
                resume = f"use --resume {self.path} to continue it or " if resumable else "choose another --out or "
                raise UsageError(f"--out {self.path}: already holds a run; {resume}pass --overwrite "
                                 f"to replace it")
            return
        if self._creation_was_cut_short():
            return
        foreign = self._layout_files()
        if _present(self.tensorboard_dir):
            foreign.append(self.tensorboard_dir)
        if foreign:
            names = ", ".join(str(p.relative_to(self.path)) for p in foreign[:3])
            them = "them" if len(foreign) > 1 else "it"
            raise UsageError(f"--out {self.path}: holds {names}, which no xpmodel run here wrote "
                             f"(there is no run.json); xpmodel will not replace {them}, even with "
                             f"--overwrite: move {them} away or choose another --out")
        if self._other_entries() and not overwrite:
            raise UsageError(f"--out {self.path}: directory is not empty and is not a run; "
                             f"choose another --out or pass --overwrite (which keeps its files "
                             f"and adds the run's beside them)")

    def _creation_was_cut_short(self):
        """No run.json, but a lock file left by a process that died creating the run."""
        if self.is_run() or not self.path.is_dir():
            return False
        held = held_lock(self.path)
        if held is not None:
            return held.found_stale
        return _present(self.lock_path) and lock_file_problem(self.lock_path) is None \
            and lock_is_free(self.lock_path)

    def create(self, config, tokenizer, overwrite=False, first_checkpoint=None):
        """Start a new run here, refusing to mix with another run's files.

        first_checkpoint(path): writes the step-0 checkpoint before run.json
        marks the folder as a run. Every file is written and synced aside
        before a run already here (--overwrite) is removed, so a full disk
        leaves that run as it was. If creating fails, the files it put in
        place are removed again; files that were there before are never
        touched, nor a replaced run's before the new files are all written.
        """
        with self.lock("--out"):
            self.check_can_create(overwrite)
            replacing = self.is_run() or self._creation_was_cut_short()
            made_checkpoint_dir = not self.checkpoint_dir.is_dir()
            placed, removed = [], False
            held = ExitStack()   # signals, from the old run's removal until run.json is written
            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                with held:
                    with staged_writes() as staged:
                        save_config(config, self.config_path)
                        tokenizer.save(self.tokenizer_path)
                        if first_checkpoint is not None:
                            first_checkpoint(self.step_path(0))
                        # a Ctrl-C from here on would leave neither the old run nor the new one
                        held.enter_context(deferred_signals())
                        if replacing:
                            removed = True
                            self._remove_run_files()
                        staged.place(placed)
                    marker = {"format": RUN_FORMAT, "version": FORMAT_VERSION, "created": time.time()}
                    placed.append(self.marker)
                    atomic_write_json(self.marker, marker)
                    placed.clear()   # created: a signal held until now leaves the run as it is
            except BaseException as exc:
                with deferred_signals():   # a second Ctrl-C cannot cut the cleanup short
                    for path in placed:
                        path.unlink(missing_ok=True)
                    if made_checkpoint_dir:
                        _remove_empty_folder(self.checkpoint_dir)
                if not isinstance(exc, OSError):
                    raise
                if not replacing:
                    kept = "the run was not created (the files it wrote are removed)"
                elif removed:
                    kept = "the run that was there was removed, and the new one was not created"
                else:
                    kept = "the run that was there is kept as it was"
                raise XpmodelError(f"could not write {exc.filename or self.path}: "
                                   f"{exc.strerror or exc}; {kept}") from None

    def _remove_run_files(self):
        """Remove what a previous run (or a cut-short creation) wrote; nothing else:
        a temporary whose writer still runs is that writer's (`_own_temporaries`)."""
        # run.json last: a folder stopped midway is still a run, which --overwrite takes again
        files = self._layout_files() + self._own_temporaries(only_dead=True)
        for path in sorted(files, key=lambda path: path == self.marker):
            if path.is_dir() and not path.is_symlink():
                continue   # a folder with such a name is not something xpmodel wrote
            if path.parent == self.checkpoint_dir and _CHECKPOINT_FILE.match(path.name) \
                    and self.foreign_checkpoint_file(path):
                continue   # nor a link or a file with a checkpoint's name that is not one
            path.unlink(missing_ok=True)

    def require_run(self, flag="RUN_DIR"):
        """Refuse a path that is not a run (one line, naming it; a sweep's
        folder is named as one, its lock, held or left by a killed sweep, never
        taken for a run's); with flag --resume, also a run whose folders are
        links (`check_folders_owned`), as it is about to be written."""
        if _present(self.path) and not self.path.is_dir():
            raise UsageError(f"{flag} {self.path}: is a file, not a run directory")
        if not self.path.is_dir():
            raise UsageError(f"{flag} {self.path}: no such directory{self._closest_run_hint()}")
        if not self.is_run():
            if (self.path / SWEEP_STATE).is_file():    # the sweep may hold its lock: not a run's
                raise UsageError(f"{flag} {self.path}: not an xpmodel run (no run.json) but a "
                                 f"sweep folder ({SWEEP_STATE}); its trials are the runs: "
                                 f"{self.path / 'trials'}/trial-NNN")
            if self._creation_was_cut_short():
                raise UsageError(f"{flag} {self.path}: the run was stopped while it was being "
                                 f"created; start it again with --out {self.path}")
            self.refuse_if_being_written(flag)
            raise UsageError(f"{flag} {self.path}: not an xpmodel run (no run.json)"
                             f"{self._closest_run_hint()}")
        marker = read_json(self.marker, _MAX_MARKER_BYTES, CheckpointError, "run marker")
        if marker.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{self.marker}: not an xpmodel run marker")
        if type(marker.get("version")) is not int or marker["version"] > FORMAT_VERSION:
            raise CheckpointError(f"{self.marker}: run format version {quote(marker.get('version'), 40)} "
                                  f"is newer than this xpmodel reads; upgrade xpmodel")
        if flag == "--resume":
            self.check_folders_owned(flag)

    def _closest_run_hint(self):
        """'; did you mean runs/x?' naming the most similar run beside this path, if any."""
        parent = self.path.parent
        try:
            runs = [p.name for p in parent.iterdir() if p.name != self.path.name and (p / "run.json").is_file()][:1000]
        except OSError:
            return ""
        close = difflib.get_close_matches(self.path.name, runs, n=1, cutoff=0.6)
        return f"; did you mean {parent / close[0]}?" if close else ""

    def load_config(self):
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: missing")
        return load_config(self.config_path)

    def load_tokenizer(self):
        return BPETokenizer.load(self.tokenizer_path)

    # ---- checkpoints ------------------------------------------------------------
    def _step_files(self):
        """(step, path) of every entry of checkpoints/ named like a step
        checkpoint (8 digits, more from step 10**8), oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for path in self.checkpoint_dir.iterdir():
            step = step_of_name(path.name)
            if step is not None:
                found.append((step, path))
        return sorted(found)

    def checkpoint_steps(self):
        """Steps of the step-N checkpoints present, oldest first."""
        return [step for step, _ in self._step_files()]

    def checkpoints_newest_first(self):
        """(path, header, problem) for every step checkpoint, newest first, as
        `read_checkpoint` gives them, each header read when the iteration comes
        to it (a list of them serves every check of a resume: none is read twice)."""
        for _, path in reversed(self._step_files()):
            yield (path, *self.read_checkpoint(path))

    def read_checkpoint(self, path):
        """(CheckpointHeader, None) when the checkpoint at `path` reads
        cleanly, else (None, why it cannot be used); a link out of the run, or
        a file in a checkpoints/ that is a link, is not read."""
        if Path(path).parent == self.checkpoint_dir and self.checkpoint_dir.is_symlink():
            return None, (f"{path}: {self.checkpoint_dir} is a link to a folder the run does not "
                          f"own; ignored")
        if not self.contains(path):
            return None, f"{path}: links outside the run directory; ignored"
        try:
            return read_checkpoint_header(path), None
        except CheckpointError as exc:
            return None, str(exc)

    def latest_checkpoint(self):
        """(path, skipped): the newest step checkpoint whose header reads
        cleanly, or None, and why each newer one cannot be used.

        A file that fails (truncated by a full disk, say) is skipped, so an
        older intact one is used instead; older ones are not read.
        """
        skipped = []
        for path, header, problem in self.checkpoints_newest_first():
            if header is not None:
                return path, skipped
            skipped.append(problem)
        return None, skipped

    def checkpoint_config_problem(self, header, config):
        """None when the checkpoint of `header` was trained with `config`'s
        data.* and model.* settings (or records none: an imported one), else
        which differs (a checkpoint copied from another run, say)."""
        difference = _config_difference(header.meta, config)
        if difference is None:
            return None
        key, value, before = difference
        return (f"{header.path}: trained with {key}={quote(before, 80)}, not the run's "
                f"{quote(value, 80)}")

    def check_config_matches_checkpoint(self, config, checkpoints):
        """Refuse a config.yaml whose data.* or model.* settings differ from
        those every readable checkpoint (of `checkpoints`, a list of
        checkpoints_newest_first's) was trained with (a hand edit, say), naming
        the checkpoints. While one matches, those that do not (copied from
        another run) are left for the resume to skip, as damaged ones are."""
        differing = []
        for path, header, _ in checkpoints:
            if header is not None:
                difference = _config_difference(header.meta, config)
                if difference is None:
                    return
                differing.append((path, difference))
        if not differing:
            return
        (path, (key, value, before)), others = differing[0], [p.name for p, _ in differing[1:]]
        nor = f", nor any other checkpoint ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" \
            if others else ""
        new_data = (f", or train on the new data from this run's weights with --init-from "
                    f"{self.path}" if key.startswith("data.") else "")
        raise CheckpointError(f"{self.config_path}: {key} is {quote(value, 80)}, but {path.name} "
                              f"was trained with {quote(before, 80)}{nor}; only train.* settings "
                              f"can change within a run: put it back, move away checkpoints "
                              f"copied from another run{new_data}")

    def check_optimizer_matches_checkpoints(self, config, checkpoints):
        """Refuse, as a usage error, to resume with a train.optimizer that none
        of the run's trained checkpoints (readable ones of `checkpoints`, a
        list of checkpoints_newest_first's, of `config`'s data.* and model.*
        settings) was saved with: their optimizer state is another
        optimizer's. While one of them matches, a copied-in checkpoint of
        another optimizer is left for the resume to skip, as a damaged one is;
        a run with only an imported (weights-only) checkpoint takes any."""
        saved = [optimizer for _, header, _ in checkpoints
                 if header is not None and _config_difference(header.meta, config) is None
                 and (optimizer := saved_optimizer(header.meta)) is not None]
        if saved and config.train.optimizer not in saved:
            raise UsageError(f"--resume {self.path}: its checkpoints were saved with "
                             f"train.optimizer={saved[0]}; resume with that optimizer (or start "
                             f"a new run with --init-from {self.path})")

    def owns(self, path):
        """Whether `path` (links resolved) is one of the files the run writes
        and reads back, which no other output may replace: run.json,
        config.yaml, tokenizer.json, metrics.jsonl, its lock, wandb/run-id, or
        anything under checkpoints/ or tensorboard/ (not its plots, which
        `plot --out` may rewrite)."""
        try:
            run = RunDir(self.path.resolve())
            resolved = Path(os.path.abspath(path)).resolve()
        except (OSError, RuntimeError):
            return False
        return resolved in (run.marker, run.config_path, run.tokenizer_path, run.metrics_path,
                            run.lock_path, run.wandb_id_path) or \
            inside(resolved, run.checkpoint_dir) or inside(resolved, run.tensorboard_dir)

    def contains(self, path):
        """True when `path`, links resolved, lies inside the run directory."""
        try:
            Path(path).resolve().relative_to(self.path.resolve())
            return True
        except (OSError, ValueError, RuntimeError):
            return False

    def prune_checkpoints(self, keep_last, written=None, resumed_from=None, config=None,
                          already_read=()):
        """Keep the newest `keep_last` good step checkpoints, delete older ones.

        Only xpmodel's own checkpoints count and are ever deleted: regular
        files (not links, not folders) whose header reads as a good xpmodel
        checkpoint of this run's data.* and model.* settings (not one copied
        from another run). A damaged file never counts toward keep_last (nor is it
        deleted: it may be all that is left of a step). The checkpoint just
        `written` is always kept, and the one `resumed_from` until a newer
        good one exists. The untrained step-0 one is not kept once a later
        good checkpoint exists. `config`: the run's (the trainer passes its
        own), else read from config.yaml. `already_read`: (path, header,
        problem) of checkpoints whose headers were read before (by the
        resume), not read again while their files are unchanged. A file
        replaced or rewritten after it was judged is left as it is.
        """
        if not self._owns_checkpoint_dir():
            return   # a linked checkpoints/ is not the run's to prune
        try:
            config = config or self.load_config()
        except XpmodelError:   # config.yaml unreadable: which checkpoints are the run's is unknown
            return
        known = {path: header for path, header, _ in already_read if header is not None}
        good = []   # (step, path, header) of the run's own good checkpoints, oldest first
        for step, path in self._step_files():
            header = self._own_checkpoint_header(path, config, known.get(path))
            if header is not None:
                good.append((step, path, header))
        keep = {path.name for _, path, _ in good[max(len(good) - keep_last, 0):]}
        if len(good) > 1 and good[0][0] == 0:
            keep.discard(good[0][1].name)
        if resumed_from is not None:
            resumed_step = step_of_name(Path(resumed_from).name)
            if not any(step > (resumed_step or 0) for step, _, _ in good):
                keep.add(Path(resumed_from).name)
        if written is not None:
            keep.add(Path(written).name)
        for _, path, header in good:
            if path.name not in keep and not path.is_symlink() and header.unchanged():
                try:   # unchanged: still the file judged above, not one put there since
                    path.unlink()
                except OSError:
                    pass   # housekeeping: a file that cannot be removed stays

    @staticmethod
    def foreign_checkpoint_file(path):
        """Why the entry at `path`, named as a checkpoint, is not xpmodel's to
        replace or remove: a link, a folder or a FIFO, or a file whose header
        does not name it an xpmodel checkpoint (someone's own file); None
        when there is no entry or it is one, whole or damaged past its header
        (a step trained again is saved over it)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot be read ({exc.strerror or exc})"
        if not stat.S_ISREG(mode):
            return f"is {file_kind(mode)}"
        try:
            ours = names_itself_a_checkpoint(path)
        except CheckpointError as exc:
            return f"is not an xpmodel checkpoint ({str(exc).removeprefix(f'{path}: ')})"
        return None if ours else "is a safetensors file of another program"

    def _own_checkpoint_header(self, path, config, header=None):
        """The header of the regular file (not a link) at `path` when it reads
        as a good xpmodel checkpoint trained with `config`'s data.* and model.*
        settings, else None; `header`, when the file is unchanged since it
        was read, is not read again."""
        try:
            if path.is_symlink() or not path.is_file():
                return None
            if header is None or not header.unchanged():
                header = read_checkpoint_header(path)
            return header if _config_difference(header.meta, config) is None else None
        except (CheckpointError, OSError):
            return None

    def remove_stale_temporaries(self):
        """Temporary files left by a process killed mid-write."""
        for path in self._own_temporaries(only_dead=True):
            path.unlink(missing_ok=True)

    # ---- metrics (train/metrics_file.py) -------------------------------------------
    def append_metrics(self, record, handle=None):
        append_record(self.metrics_path, record, handle)

    def read_metrics(self, warn=None):
        return read_records(self.metrics_path, warn)

    def truncate_metrics(self, step):
        truncate_records(self.metrics_path, step)


def saved_optimizer(meta):
    """train.optimizer of the config a checkpoint (its metadata, `meta`) was
    saved with: adamw when it predates Muon; None for an imported checkpoint,
    which holds weights alone."""
    if meta.get("kind") == "imported":
        return None
    config = meta.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    return train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"


def _config_difference(meta, config):
    """(dotted key, config's value, checkpoint's value) of the first data.* or
    model.* setting that the checkpoint whose metadata is `meta` was trained
    with otherwise; None when all agree or it records none (an imported one).
    An option the config's architecture never reads (rope_theta with learned
    positions: `unused_options`) is not compared: it changes nothing."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return None   # an imported checkpoint: weights only
    current = config_to_dict(config)
    ignored = {("data", "cache_dir"), *(("model", key) for key in unused_options(config.model))}
    for section in ("data", "model"):
        before = saved.get(section)
        if not isinstance(before, dict):
            continue
        for key, value in current[section].items():
            if (section, key) not in ignored and key in before and before[key] != value:
                return f"{section}.{key}", value, before[key]
    return None


def _present(path):
    """Exists, or is a link (even a dangling one)."""
    return os.path.lexists(path)


def _remove_empty_folder(path):
    try:
        path.rmdir()
    except OSError:
        pass


def _unused(path):
    """A fresh run directory name next to `path`: path, path-2, path-3..."""
    path = Path(path)
    if not _present(path):
        return path
    for n in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{n}")
        if not _present(candidate):
            return candidate
    raise UsageError(f"{path}: too many runs with this name")


def default_run_path(config_name):
    """runs/CONFIG_NAME, or runs/CONFIG_NAME-2, -3, ... when that is taken."""
    return _unused(Path("runs") / Path(str(config_name)).stem)
