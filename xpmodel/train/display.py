"""What a training run shows the user.

In a terminal: a rich progress bar (step/total, ETA) whose fields carry the
smoothed loss, last validation loss, learning rate, gradient norm, tokens/s
and, on a GPU, MFU; evaluations and samples are printed above it through
the progress console, so the bar never tears. Without a terminal (CI, pipes,
--quiet, and under mpirun with several ranks, whose terminals are the job's
log) the same figures become plain log lines, with no escape codes.
Generated samples are shown with their control characters escaped, so an
untrained model's output cannot move the cursor or recolour the terminal.
"""
import math
import re
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text):
    """`text` with control characters other than newline and tab shown as escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _fields_text(fields):
    """The figures after the step count and ETA, short enough that the whole
    line fits 80 columns: `loss~` is the smoothed (moving-average) train loss.
    A run by epochs shows `epoch N/M` first, in the room of the gradient norm."""
    parts = [f"loss~ {fields['loss']}", f"val {fields['val']}", f"lr {fields['lr']}",
             f"|g| {fields['grad_norm']}", f"{fields['tok_s']} tok/s"]
    if fields.get("epoch"):
        parts[3] = f"epoch {fields['epoch']}"
        parts.insert(0, parts.pop(3))
    if fields.get("mfu"):
        parts.append(f"MFU {fields['mfu']}")
    return " ".join(parts)


def compact_number(number):
    """12345.6 -> '12.3k': a rate or a count in few characters."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.0f}"


def perplexity_text(perplexity):
    """A perplexity to two decimals, or to three digits once it is huge (a
    diverged run's reaches exp(700), a number of 305 digits)."""
    return f"{perplexity:.2f}" if perplexity < 1e6 else f"{perplexity:.3g}"


def _eta(seconds):
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainDisplay:
    """Live bar or plain lines; use as a context manager."""

    def __init__(self, total_steps, start_step=0, quiet=False, enabled=True, stream=None,
                 last_val=None, total_epochs=None):
        self.enabled = enabled
        self.console = Console(file=stream or sys.stdout, highlight=False)
        self.live = enabled and not quiet and self.console.is_interactive   # not TERM=dumb
        self.total_steps = total_steps
        self.start_step = start_step
        self.fields = {"loss": "-", "val": "-" if last_val is None else f"{last_val:.4f}",
                       "lr": "-", "grad_norm": "-", "tok_s": "-", "mfu": "",
                       "epoch": f"1/{total_epochs}" if total_epochs else ""}
        self.total_epochs = total_epochs   # a run by train.epochs: shown as epoch N/M
        self._progress = None
        self._task = None
        self._started = None   # (time, step) when the first step was reported

    def __enter__(self):
        if self.live:
            # Step and ETA first and never cut; a narrow terminal cuts the figures.
            steps_width = 2 * len(str(self.total_steps)) + 1
            self._progress = Progress(
                MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=steps_width)),
                TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
                BarColumn(bar_width=10),
                TextColumn("{task.fields[summary]}",
                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total_steps,
                                                 completed=self.start_step,
                                                 summary=_fields_text(self.fields))
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def step(self, step, loss, lr, grad_norm, tokens_per_s, mfu=None, log_line=False, epoch=None):
        """Refresh the figures after `step` steps; in plain mode print when log_line.
        epoch: passes over the data so far (fractional), shown as the epoch under way."""
        if self.total_epochs and epoch is not None:
            current = min(max(1, math.ceil(epoch - 1e-9)), self.total_epochs)   # 1-based
            self.fields["epoch"] = f"{current}/{self.total_epochs}"
        self.fields.update(loss=f"{loss:.4f}", lr=f"{lr:.1e}".replace("e-0", "e-"), grad_norm=f"{grad_norm:.2f}",
                           tok_s=compact_number(tokens_per_s), mfu=f"{100 * mfu:.1f}%" if mfu else "")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=_fields_text(self.fields))
        elif log_line:
            self.print(f"step {step}/{self.total_steps} eta {self._eta(step)} " + _fields_text(self.fields))

    def _eta(self, step):
        """Time left at the average pace since the first reported step."""
        now = time.monotonic()
        if self._started is None or step <= self._started[1]:
            self._started = self._started or (now, step)
            return _eta(None)
        start_time, start_step = self._started
        return _eta((now - start_time) / (step - start_step) * (self.total_steps - step))

    def validation(self, record, best):
        """One line from an eval record: the val loss and, with the mean train
        loss of the steps since the last evaluation, that loss, the gap
        val - train and both perplexities."""
        step, val_loss, train_loss = record["step"], record["val_loss"], record.get("train_loss")
        self.fields["val"] = f"{val_loss:.4f}"
        val_perplexity = perplexity_text(record["val_perplexity"])
        if train_loss is None:
            text = f"step {step}: val loss {val_loss:.4f}, perplexity {val_perplexity}"
        else:
            text = (f"step {step}: val loss {val_loss:.4f}, train loss {train_loss:.4f}, "
                    f"gap {record['gap']:+.4f}; perplexity {val_perplexity} val, "
                    f"{perplexity_text(record['train_perplexity'])} train")
        self.print(text + ("  (best so far)" if best else ""))

    def sample(self, step, text):
        self.print(f"--- sample at step {step} ---")
        if self.enabled:
            self.console.print(self._encodable(printable(text)), markup=False, highlight=False,
                               soft_wrap=True)
        self.print("---")

    def print(self, text):
        if self.enabled:
            self.console.print(self._encodable(text), markup=False, highlight=False, soft_wrap=True)

    def _encodable(self, text):
        """`text` with what the output's encoding cannot show as escapes (an
        ASCII-only stdout must not end a run at its first sample)."""
        encoding = self.console.encoding or "utf-8"
        return text.encode(encoding, "backslashreplace").decode(encoding)
