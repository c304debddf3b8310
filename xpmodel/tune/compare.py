"""`xpmodel runs` and `xpmodel compare`: what run directories hold, read from
their metrics.jsonl (the source of truth), config.yaml and checkpoint headers.

A run's status: "running" while a process holds its lock, "imported" when
`xpmodel import-hf` made it and it has not trained (its newest checkpoint is
the step-0 one import-hf wrote, kind "imported"), "finished" once its last
logged step reaches the config's length, else "stopped" (interrupted,
early-stopped, diverged or killed: `xpmodel train --resume` continues it).
"""
import sys
from pathlib import Path

from ..config import config_to_dict
from ..errors import CheckpointError, DataError, UsageError
from ..files import finite_json_number
from ..train.checkpoint import step_of_name
from ..train.display import compact_number
from ..train.rundir import RunDir
from .plot import check_png_output, pyplot, save_figure

_MAX_DEPTH = 3   # run directories are looked for this many folders down


def find_runs(root):
    """The run directories at or below `root` (sorted by path)."""
    root = Path(root)
    if RunDir(root).is_run():
        return [RunDir(root)]
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: is a file, not a run directory or a folder of runs")
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    found = []

    def walk(folder, depth):
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for path in entries:
            if RunDir(path).is_run():
                found.append(RunDir(path))
            elif depth < _MAX_DEPTH and path.name != "checkpoints":
                walk(path, depth + 1)
    walk(root, 1)
    return found


def summarize(run):
    """A dict of what one run holds: status, steps, tokens, losses, wall time.
    Damaged lines of its metrics.jsonl are skipped with a warning naming them,
    and a lock file that is not one xpmodel made (a link, a FIFO) is named in
    a warning (it is never opened: nobody holds it)."""
    records = run.read_metrics()
    lock_problem = run.lock_problem()
    if lock_problem is not None:
        print(f"warning: {lock_problem}", file=sys.stderr)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and finite_json_number(r.get("val_loss"))]
    try:
        config = run.load_config()
    except (CheckpointError, UsageError):
        config = None
    step = train[-1]["step"] if train else 0
    newest = _newest_checkpoint(run, config, step if train else None)
    total = config.train.max_iters if config is not None else None
    if total is None and newest is not None and newest.meta.get("step") == step:
        total = newest.meta.get("total_steps")   # a run sized in epochs: its length when saved
    if run.is_locked():
        status = "running"
    elif not train and newest is not None and newest.meta.get("kind") == "imported":
        status = "imported"
    elif total is not None and step >= total or (
            config is not None and config.train.epochs and train
            and train[-1].get("epoch", 0) >= config.train.epochs - 1e-9):
        status = "finished"
    else:
        status = "stopped"
    tokens = newest.meta.get("tokens_seen") if newest is not None else None
    if tokens is None and config is not None:
        t = config.train
        tokens = step * t.batch_size * t.grad_accum * config.model.block_size
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {"run": str(run.path), "status": status, "step": step, "total_steps": total,
            "tokens": tokens,
            "best_val": best["val_loss"] if best else None, "best_step": best["step"] if best else None,
            "last_val": evals[-1]["val_loss"] if evals else None,
            "train_loss": train[-1].get("loss") if train else None,
            "wall_time_s": _wall_time(train, newest),
            "warnings": sorted({r.get("kind") for r in records if r.get("type") == "warning"}),
            "config": config}


def _newest_checkpoint(run, config, last_step):
    """The header of the newest checkpoint that is the run's own: it reads
    cleanly (older ones are not read), its step is at or below `last_step`
    (the last logged step; None when none is) and, when `config` read, it was
    trained with config's data.* and model.* settings. Any other is a file a
    resume skipped (its tensors damaged, or copied from another run): the run
    went on from an older one and logged its steps again from there."""
    for path, header, _ in run.checkpoints_newest_first():
        if header is None or last_step is not None and step_of_name(path.name) > last_step:
            continue
        if config is None or run.checkpoint_config_problem(header, config) is None:
            return header
    return None


def _wall_time(train, newest):
    """The run's training time in seconds: the later of its last step's record
    and its newest checkpoint's "elapsed", which the final save takes after
    the last evaluation (the run records no time after that save)."""
    times = [train[-1].get("time") if train else None,
             newest.meta.get("elapsed") if newest is not None else None]
    times = [t for t in times if finite_json_number(t)]
    return max(times) if times else None


def runs_table(summaries, extra_columns=()):
    """Rows of text for `xpmodel runs` / `compare`; extra_columns: dotted config keys."""
    headers = ["run", "status", "steps", "tokens", "best val (step)", "last val", "wall time",
               *extra_columns, "warnings"]
    rows = []
    for s in summaries:
        steps = f"{s['step']:,}" + (f"/{s['total_steps']:,}" if s["total_steps"] else "")
        best = "-" if s["best_val"] is None else f"{s['best_val']:.4f} ({s['best_step']:,})"
        tokens = "-" if s["tokens"] is None else compact_number(s["tokens"])
        flat = _flatten(config_to_dict(s["config"])) if s["config"] is not None else {}
        rows.append([s["run"], s["status"], steps, tokens, best,
                     "-" if s["last_val"] is None else f"{s['last_val']:.4f}",
                     _duration(s["wall_time_s"]), *[_show(flat.get(k)) for k in extra_columns],
                     ",".join(s["warnings"]) or "-"])
    return format_table(headers, rows)


def differing_keys(summaries):
    """The dotted config keys whose values differ among the runs."""
    flats = [_flatten(config_to_dict(s["config"])) for s in summaries if s["config"] is not None]
    if len(flats) < 2:
        return []
    keys = sorted(set().union(*flats))
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def _flatten(document):
    return {f"{section}.{key}": value for section, values in document.items()
            for key, value in values.items()}


def _show(value):
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)



def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_table(headers, rows):
    """Lines of a plain aligned table (no terminal codes, so it pipes and logs well)."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def plot_runs(summaries, out, title="xpmodel compare"):
    """One PNG overlaying the runs' training loss (smoothed) and validation loss
    against step; returns its path."""
    plt = pyplot("the plot")
    out = check_png_output(out)
    fig, (train_axes, val_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = 0
    for i, s in enumerate(summaries):
        records = RunDir(s["run"]).read_metrics(warn=lambda text: None)   # summarize warned
        train = [(r["step"], r["loss"]) for r in records
                 if r.get("type") == "train" and finite_json_number(r.get("loss"))]
        evals = [(r["step"], r["val_loss"]) for r in records
                 if r.get("type") == "eval" and finite_json_number(r.get("val_loss"))]
        colour, label = colours[i % len(colours)], Path(s["run"]).name
        if train:
            steps, losses = zip(*train)
            train_axes.plot(steps, _ema(losses), color=colour, lw=1.2, label=label)
            plotted += 1
        if evals:
            val_axes.plot(*zip(*evals), "o-", ms=3, color=colour, label=label)
    if not plotted:
        plt.close(fig)
        raise DataError("none of the runs has logged a training step yet")
    train_axes.set_title("training loss (smoothed)")
    val_axes.set_title("validation loss")
    for ax in (train_axes, val_axes):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(plt, fig, out)


def _ema(values, beta=0.9):
    out, average = [], None
    for v in values:
        average = v if average is None else beta * average + (1 - beta) * v
        out.append(average)
    return out
