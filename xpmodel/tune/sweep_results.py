"""A sweep's results: the table of its trials (printed, or live in a
terminal) and the files it writes, results.csv, results.json, best.yaml and
curves.png."""
import csv
import io
import sys

from rich.live import Live
from rich.table import Table

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import load_config, save_config
from ..errors import UsageError
from .plot import pyplot, save_figure
from .sweep_plan import format_value, trial_overrides


def trial_table(trials, metric):
    """(headers, rows of text) of the trials: name, values, step, best metric, state."""
    keys = list(dict.fromkeys(k for t in trials for k in t["params"]))
    rows = [[t["name"], *[format_value(t["params"].get(k)) for k in keys], str(t.get("step", 0)),
             metric_text(t.get("metric")), t["status"]] for t in trials]
    return ["trial", *keys, "step", f"best {metric}", "state"], rows


def write_results(folder, state, metric, config, largest=None):
    """Write the sweep's result files into `folder`; returns results.json's
    document. The best trial is the finished one of the lowest metric, or
    with `largest` (a key) the one of the largest value of that key."""
    trials = state["trials"]
    keys = list(dict.fromkeys(k for t in trials for k in t["params"]))
    rows = [{"trial": t["name"], "status": t["status"],
             **{k: t["params"].get(k) for k in keys},
             metric: t.get("metric"), "best_step": t.get("best_step"),
             "steps": t.get("step"), "wall_time_s": t.get("wall_time_s")} for t in trials]
    ranked = sorted((t for t in trials if t["status"] == "done" and t.get("metric") is not None),
                    key=(lambda t: -t["params"][largest]) if largest else (lambda t: t["metric"]))
    best = ranked[0] if ranked else None
    document = {"metric": metric, "best": best and best["name"],
                "best_params": best and best["params"], "trials": rows}
    atomic_write_json(folder / "results.json", document)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "results.csv", text.getvalue().encode())
    if best is not None:
        overrides = [o for o in trial_overrides(config, best["params"], state["fixed"])
                     if not o.startswith("train.max_iters=")]
        save_config(load_config(config, overrides), folder / "best.yaml")
    _plot_curves(folder, trials, metric)
    return document


def _plot_curves(folder, trials, metric):
    try:
        plt = pyplot()
    except UsageError:   # the curves need matplotlib; the tables do not
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for t in trials:
        if not t.get("evals"):
            continue
        style = {"done": "-", "pruned": ":", "failed": ":", "running": "--"}.get(t["status"], "-")
        ax.plot(*zip(*t["evals"]), style, marker="o", ms=3,
                label=f"{t['name']} {params_text(t['params'])} ({t['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"sweep {folder.name}: {metric} of every trial")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    save_figure(plt, fig, folder / "curves.png")


def params_text(params):
    return " ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in params.items())


def metric_text(value):
    """A metric to four decimals, or - where there is none."""
    return "-" if value is None else f"{value:.4f}"


class LiveTable:
    """A live rich table of a sweep's trials in a terminal; nothing otherwise
    (the sweep prints a line per event instead)."""

    def __init__(self, sweep):
        self.sweep = sweep
        self.live = None

    def __enter__(self):
        if sys.stdout.isatty():
            self.live = Live(self._render(), refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def refresh(self):
        if self.live is not None:
            self.sweep.refresh_rows()
            self.live.update(self._render())

    def _render(self):
        headers, rows = trial_table(self.sweep.state["trials"], self.sweep.metric)
        table = Table(title=f"sweep {self.sweep.dir.path}")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        return table
