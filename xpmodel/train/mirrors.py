"""train.log_to: metrics.jsonl's records, the samples and the config mirrored
to TensorBoard and Weights & Biases, where people already look.

metrics.jsonl stays the source of truth: a mirror is written after the record
is, a mirror that fails (a missing package, a full disk, a W&B error) warns
once, on the display and as a `warning` record of kind `log_to`, and is off for
the rest of the process; training never stops for one.

    tensorboard  RUN_DIR/tensorboard/  event files written by tensorboardX (numpy
                 and protobuf only, no torch or TensorFlow; `xpmodel[tensorboard]`)
    wandb        RUN_DIR/wandb/        a W&B run; offline unless WANDB_MODE says
                 otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it)

Each number of a record becomes the scalar TYPE/KEY at the record's step
(train/loss, eval/val_loss, ...); a health record's lists become
health/KEY/GROUP; warnings and samples are text. A resumed run continues the
same mirrors: TensorBoard's writer purges the steps after the checkpoint it
resumed from (they are cut from metrics.jsonl too), and the W&B run keeps its
id in RUN_DIR/wandb/run-id (W&B ignores steps it has already seen).
"""
import html
import os
import re
import secrets
import threading

from ..atomic import atomic_write_bytes
from ..config import config_to_dict, config_to_yaml
from ..errors import XpmodelError, quote
from ..files import read_bounded

_RUN_ID = re.compile(r"[0-9a-f]{8}")    # as WandbSink makes them


class Mirrors:
    """The run's train.log_to mirrors. `say(text)` shows a warning to the user."""

    def __init__(self, run_dir, config, step, say):
        self.run_dir, self.say = run_dir, say
        self.sinks = {}
        failed = []
        for name in config.train.log_to:
            try:
                self.sinks[name] = SINKS[name](run_dir, config, step)
            except Exception as exc:      # noqa: BLE001 - a mirror never stops training
                failed.append((name, exc))
        for name, exc in failed:          # once the others are there to mirror the warning
            self._failed(name, exc, step)

    @classmethod
    def off(cls):
        mirrors = cls.__new__(cls)
        mirrors.sinks = {}
        return mirrors

    def record(self, record):
        """One metrics.jsonl record, mirrored."""
        self._each("record", record.get("step", 0), record)

    def sample(self, step, text):
        self._each("sample", step, step, text)

    def close(self):
        for name in list(self.sinks):
            self._each("close", None, only=name)
        self.sinks = {}

    def _each(self, method, step, *args, only=None):
        for name, sink in list(self.sinks.items()):
            if (only is not None and name != only) or name not in self.sinks:
                continue                  # (a sink that failed while another's warning was mirrored)
            try:
                getattr(sink, method)(*args)
            except Exception as exc:      # noqa: BLE001
                del self.sinks[name]
                self._failed(name, exc, step)

    def _failed(self, name, exc, step):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        problem = f"{type(exc).__name__}{': ' + detail[:300] if detail else ''}"
        if isinstance(exc, ImportError):
            problem = f"{problem}; pip install 'xpmodel[{name}]'"
        text = (f"train.log_to {name}: {problem}; not mirroring to {name} for the rest of this "
                f"run (metrics.jsonl is complete)")
        self.say(f"warning: {text}")
        record = {"type": "warning", "step": step or 0, "kind": "log_to", "message": text}
        try:
            self.run_dir.append_metrics(record)
        except OSError:
            return
        self.record(record)               # to the mirrors still on


def _scalars(record):
    """{tag: number} of a metrics record."""
    kind = record.get("type", "record")
    out = {}
    groups = record.get("groups") if isinstance(record.get("groups"), list) else None
    for key, value in record.items():
        if key in ("type", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = float(value)
        elif groups and isinstance(value, list) and len(value) == len(groups):
            for group, item in zip(groups, value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    out[f"{kind}/{key}/{group}"] = float(item)
    return out


class TensorBoardSink:
    """tensorboardX writes the events from a thread of its own. A write that
    fails there (a full disk) ends that thread: its error is kept, not printed
    through the display (`_keep_writer_errors`), and the next call raises it,
    before a put into the thread's queue could block training for good."""

    def __init__(self, run_dir, config, step):
        from tensorboardX import SummaryWriter
        _keep_writer_errors()
        # purge_step: TensorBoard drops earlier processes' events after the step
        # this one starts from (metrics.jsonl lost them too when the run resumed;
        # all of them when --overwrite started the run again)
        self.writer = SummaryWriter(logdir=str(run_dir.tensorboard_dir),
                                    purge_step=step + 1, flush_secs=10,
                                    # ordered after the earlier files, even in the same second
                                    filename_suffix=f".step{step:010d}")
        self.writer.add_text("config", _fenced(config_to_yaml(config)), step)

    def record(self, record):
        step = record.get("step", 0)
        for tag, value in _scalars(record).items():
            self._add("add_scalar", tag, value, step)
        if record.get("type") == "warning":
            self._add("add_text", "warnings", f"{record.get('kind')}: {record.get('message')}",
                      step)

    def sample(self, step, text):
        self._add("add_text", "samples", _fenced(text), step)

    def close(self):
        self._check_writer()
        self.writer.close()

    def _add(self, method, *args):
        """One event, put into the writer thread's queue after a check that the
        thread runs: a thread that ends does so on an event it took from the
        queue, which leaves a place for the one put after the check."""
        self._check_writer()
        getattr(self.writer, method)(*args)

    def _check_writer(self):
        """Raise the error that ended tensorboardX's writer thread, if it ended."""
        worker = getattr(self.writer._get_file_writer().event_writer, "_worker", None)
        if worker is not None and not worker.is_alive():
            raise _writer_errors.pop(worker, None) or OSError("tensorboardX's event writer stopped")


_writer_errors = {}   # tensorboardX writer thread -> the error that ended it


def _keep_writer_errors():
    """Keep the errors that end tensorboardX's threads in _writer_errors, where
    Python would print their tracebacks; other threads' are printed as before."""
    if getattr(threading.excepthook, "keeps_writer_errors", False):
        return
    printing = threading.excepthook

    def hook(args):
        if type(args.thread).__module__.startswith("tensorboardX"):
            _writer_errors[args.thread] = args.exc_value
        else:
            printing(args)
    hook.keeps_writer_errors = True
    threading.excepthook = hook


def _fenced(text):
    """Text shown as it is by TensorBoard's markdown: indented as a code block."""
    return "\n".join("    " + line for line in text.splitlines())


class WandbSink:
    def __init__(self, run_dir, config, step):
        os.environ.setdefault("WANDB_SILENT", "true")   # no banner through the live display
        import wandb
        id_path = run_dir.wandb_id_path
        id_path.parent.mkdir(exist_ok=True)
        run_id = _read_run_id(id_path) if step and id_path.is_file() else ""
        if not run_id:                    # a new run (or one --overwrite started again)
            run_id = secrets.token_hex(4)
            atomic_write_bytes(id_path, (run_id + "\n").encode())
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir.path), id=run_id, resume="allow",
                              project=os.environ.get("WANDB_PROJECT") or "xpmodel",
                              name=run_dir.path.name, config=config_to_dict(config),
                              mode=os.environ.get("WANDB_MODE") or "offline",
                              settings=wandb.Settings(console="off", silent=True))

    def record(self, record):
        step = record.get("step", 0)
        values = _scalars(record)
        if record.get("type") == "warning":
            values["warnings"] = self.wandb.Html(
                f"<pre>{html.escape(str(record.get('kind')))}: "
                f"{html.escape(str(record.get('message')))}</pre>")
        if values:
            self.run.log(values, step=step)

    def sample(self, step, text):
        self.run.log({"samples": self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self):
        self.run.finish()


def _read_run_id(path):
    """The W&B run id a run's earlier process wrote to wandb/run-id."""
    text = read_bounded(path, 64, XpmodelError, "W&B run id").decode("ascii", "replace").strip()
    if not _RUN_ID.fullmatch(text):
        raise XpmodelError(f"{path}: {quote(text, 40)} is not a W&B run id xpmodel wrote "
                           f"(8 hex digits)")
    return text


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
