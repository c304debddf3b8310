"""The run directory: everything needed to resume, sample or evaluate a run.

    RUN_DIR/
      run.json                    marks the folder as an xpmodel run
      config.yaml                 the effective config
      tokenizer.json              the tokenizer the run trains with
      metrics.jsonl               one JSON object per logged step or evaluation
      checkpoints/step-NNNNNNNN.safetensors   the last `keep_last` saves
      checkpoints/best.safetensors            the best validation loss so far

Paths are all built here from fixed names, never from the contents of a
run's files, so nothing read from a run can point outside it; a checkpoint
that is a link to somewhere outside the run is ignored.

run.json is written last when a run is created, after its step-0
checkpoint, so any folder with a run.json holds a checkpoint to resume from.
A folder holding only the files of a creation that was cut short (no
run.json yet) is taken over by the next start without --overwrite.
"""
import json
import math
import re
import time
from pathlib import Path

from .atomic import atomic_write_bytes
from .checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint_meta
from .config import load_config, save_config
from .errors import UsageError
from .tokenizer import BPETokenizer

RUN_FORMAT = "xpmodel-run"
_STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")
_RUN_FILES = ("run.json", "config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints")


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

    def step_path(self, step):
        return self.checkpoint_dir / f"step-{step:08d}.safetensors"

    # ---- creating and opening ---------------------------------------------------
    def is_run(self):
        return self.marker.is_file()

    def check_can_create(self, overwrite=False):
        """Raise UsageError unless `create` may start a run here; cheap, so it
        runs before any slow work."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        if self.is_run() and not overwrite:
            raise UsageError(f"--out {self.path}: already holds a run; use --resume {self.path} "
                             f"to continue it or --overwrite to replace it")
        if (self.path.is_dir() and any(self.path.iterdir()) and not self.is_run()
                and not self._is_unfinished_run() and not overwrite):
            raise UsageError(f"--out {self.path}: directory is not empty and is not a run; "
                             f"choose another --out or pass --overwrite")

    def _is_unfinished_run(self):
        """Only the files of a run whose creation was cut short (no run.json)."""
        if not self.path.is_dir() or self.is_run():
            return False
        for entry in self.path.iterdir():
            if entry.name not in _RUN_FILES and not _is_temporary(entry.name):
                return False
        if self.checkpoint_dir.is_dir():
            for entry in self.checkpoint_dir.iterdir():
                if not (_STEP_FILE.match(entry.name) or entry.name == self.best_path.name
                        or _is_temporary(entry.name)):
                    return False
        return True

    def create(self, config, tokenizer, overwrite=False, first_checkpoint=None):
        """Start a new run here, refusing to mix with another run's files.

        first_checkpoint(path): writes the step-0 checkpoint before run.json
        marks the folder as a run. If creating fails, the files written so far
        are removed again.
        """
        self.check_can_create(overwrite)
        if self.is_run() or self._is_unfinished_run():
            self._remove_run_files()
        created_folder = not self.path.exists()
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.config_path)
            tokenizer.save(self.tokenizer_path)
            if first_checkpoint is not None:
                first_checkpoint(self.step_path(0))
            marker = {"format": RUN_FORMAT, "version": FORMAT_VERSION, "created": time.time()}
            atomic_write_bytes(self.marker, json.dumps(marker, indent=2).encode())
        except BaseException:
            self._remove_run_files()
            if created_folder:
                _remove_empty_folder(self.checkpoint_dir)
                _remove_empty_folder(self.path)
            raise

    def _remove_run_files(self):
        for path in [self.marker, self.config_path, self.tokenizer_path, self.metrics_path,
                     self.path / "loss.png"]:
            path.unlink(missing_ok=True)
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.is_file() and (_is_temporary(path.name) or folder == self.checkpoint_dir):
                        path.unlink(missing_ok=True)

    def require_run(self, flag="RUN_DIR"):
        if not self.path.is_dir():
            raise UsageError(f"{flag} {self.path}: no such directory")
        if not self.is_run():
            if self._is_unfinished_run():
                raise UsageError(f"{flag} {self.path}: the run was stopped while it was being "
                                 f"created; start it again with --out {self.path}")
            raise UsageError(f"{flag} {self.path}: not an xpmodel run (no run.json)")
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"{self.marker}: corrupt run marker") from None
        if not isinstance(marker, dict) or marker.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{self.marker}: not an xpmodel run marker")
        if not isinstance(marker.get("version"), int) or marker["version"] > FORMAT_VERSION:
            raise CheckpointError(f"{self.marker}: run format version {marker.get('version')} is "
                                  f"newer than this xpmodel reads; upgrade xpmodel")

    def load_config(self):
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: missing")
        return load_config(self.config_path)

    def load_tokenizer(self):
        return BPETokenizer.load(self.tokenizer_path)

    # ---- checkpoints ------------------------------------------------------------
    def checkpoint_steps(self):
        """Steps of the step-N checkpoints present, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        steps = []
        for path in self.checkpoint_dir.iterdir():
            match = _STEP_FILE.match(path.name)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def checkpoints_newest_first(self):
        """(path, problem) for every step checkpoint, newest first; problem is
        None when the file's header reads cleanly, else why it cannot be used."""
        found = []
        for step in reversed(self.checkpoint_steps()):
            path = self.step_path(step)
            problem = None
            if not self.contains(path):
                problem = f"{path}: links outside the run directory; ignored"
            else:
                try:
                    read_checkpoint_meta(path)
                except CheckpointError as exc:
                    problem = str(exc)
            found.append((path, problem))
        return found

    def latest_checkpoint(self):
        """The newest step checkpoint whose header reads cleanly, or None.

        A file that fails (truncated by a full disk, say) is skipped, so an
        older intact one is used instead; the caller is told which were skipped.
        """
        skipped = []
        for path, problem in self.checkpoints_newest_first():
            if problem is None:
                return path, skipped
            skipped.append(problem)
        return None, skipped

    def contains(self, path):
        """True when `path`, links resolved, lies inside the run directory."""
        try:
            Path(path).resolve().relative_to(self.path.resolve())
            return True
        except (OSError, ValueError):
            return False

    def prune_checkpoints(self, keep_last):
        for step in self.checkpoint_steps()[:-keep_last]:
            self.step_path(step).unlink(missing_ok=True)

    def remove_stale_temporaries(self):
        """Temporary files left by a process killed mid-write."""
        for folder in (self.path, self.checkpoint_dir):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.is_file() and _is_temporary(path.name):
                        path.unlink(missing_ok=True)

    # ---- metrics ----------------------------------------------------------------
    def append_metrics(self, record, handle=None):
        """Add one record as a JSON line; NaN and infinities are written as null."""
        line = json.dumps({k: _json_number(v) for k, v in record.items()}, allow_nan=False) + "\n"
        if handle is not None:
            handle.write(line)
            handle.flush()
        else:
            with open(self.metrics_path, "a") as f:
                f.write(line)

    def read_metrics(self):
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue   # a line cut short by a kill
        return records

    def truncate_metrics(self, step):
        """Drop records past `step`: a resumed run logs those steps again."""
        records = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        atomic_write_bytes(self.metrics_path, data)


def _is_temporary(name):
    """Names of files that xpmodel writes and renames into place."""
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".partial")


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _remove_empty_folder(path):
    try:
        path.rmdir()
    except OSError:
        pass


def _unused(path):
    """A fresh run directory name next to `path`: path, path-2, path-3..."""
    path = Path(path)
    if not path.exists():
        return path
    for n in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{n}")
        if not candidate.exists():
            return candidate
    raise UsageError(f"{path}: too many runs with this name")


def default_run_path(config_name):
    return _unused(Path("runs") / Path(str(config_name)).stem)
