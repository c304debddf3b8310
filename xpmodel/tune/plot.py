"""`xpmodel plot`: a run's train and validation loss, the gap between them, and the
learning rate, against step."""
import io
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import DataError, UsageError
from ..file_pairs import PNG_SIGNATURE, is_first_of, stamp, write_pair
from ..files import open_regular, same_file
from ..train.outputs import check_output
from ..train.rundir import RunDir

MAX_HEALTH_GROUPS = 40   # rows of a health heatmap; more are thinned, evenly, so the figure's size is bounded


def pyplot(what="xpmodel plot"):
    """matplotlib.pyplot on the Agg backend (no screen needed); a UsageError
    naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"{what} needs matplotlib: pip install 'xpmodel[plot]'") from None
    return plt


def save_figure(plt, fig, out, dpi=100):
    """Write `fig` to `out` as a PNG, atomically (a failure leaves no partial
    file), and close it; returns out."""
    atomic_write_bytes(out, png_bytes(plt, fig, dpi))
    return out


def png_bytes(plt, fig, dpi=100, metadata=None):
    """`fig` as a PNG, with `metadata` as its text chunks; the figure is closed."""
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=dpi, format="png", metadata=metadata)
    finally:
        plt.close(fig)
    return image.getvalue()


def plot_run(run_dir, out=None, overwrite=False):
    """Write a PNG of the run's metrics to `out`, and, when the run logged
    health records (train.health_interval), one of them beside it
    (NAME-health.png); returns the paths written. Both are checked before
    either is written: an `out` the user names may not replace an existing
    file unless `overwrite`, nor ever a run's own files (train/outputs.py);
    the default, RUN_DIR/loss.png and loss-health.png, are the run's plots and
    are replaced. The two are a pair written in file_pairs.py's order (`out`
    removed, the health plot naming it, then `out`), so a kill between them
    leaves a health plot alone that the rerun replaces. Without health
    records, an earlier health plot beside `out` is removed before `out` is
    written where it is that plot's partner (stamped with its name), or where
    `out` may be replaced (the run's own, or `overwrite`) and it is a PNG, so
    a new plot is never beside an older health plot; a file of the user's
    stays."""
    run = RunDir(run_dir)
    run.require_run("RUN_DIR")
    records = run.read_metrics()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    health = [r for r in records if r.get("type") == "health"]
    if not train:
        raise DataError(f"{run.metrics_path}: no training steps logged yet")
    default = run.path / "loss.png"
    out = default if out is None else check_png_output(out)
    if same_file(out, default):     # the run's own plot, however named, is refreshed in place
        out = default
    health_out = out.with_name(out.stem + "-health.png")
    if out != default:
        check_output(out, "--out", overwrite=overwrite)
        if health:
            check_output(health_out, "--out", overwrite=overwrite, partner=out)
    plt = pyplot()             # matplotlib is needed only once the inputs are known good
    fig = draw_metrics(plt, train, evals, f"xpmodel run {run.path.name}")
    if not health:
        if is_first_of(health_out, out) or \
                ((overwrite or out == default) and is_png(health_out)):
            health_out.unlink(missing_ok=True)
        return [save_figure(plt, fig, out, dpi=110)]
    health_fig = draw_health(plt, health, f"xpmodel run {run.path.name}: per-layer health")
    plot = png_bytes(plt, fig, dpi=110)
    health_plot = png_bytes(plt, health_fig, metadata=stamp(out))
    write_pair(health_out, out, lambda f: f.write(health_plot), lambda f: f.write(plot))
    return [out, health_out]


def is_png(path):
    """Whether `path` is a regular file that starts as a PNG does."""
    try:
        with open_regular(path, UsageError, "plot") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except (UsageError, OSError):
        return False


def check_png_output(out, flag="--out"):
    """`out` as a Path, refused unless it names a PNG."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{flag} {out}: the plot is a PNG; give a path ending in .png")
    return out


def draw_metrics(plt, train, evals, title):
    """A figure of the run's records against step: train loss (every step, and
    its mean over each evaluation interval) and validation loss; the gap val -
    train at each evaluation, when the records carry it; the learning rate."""
    with_gap = [r for r in evals if "gap" in r]
    heights = [3, 1, 1] if with_gap else [3, 1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 1.5 * sum(heights)),
                             sharex=True, gridspec_kw={"height_ratios": heights})
    loss_axes, lr_axes = axes[0], axes[-1]
    loss_axes.plot([r["step"] for r in train], [_number(r.get("loss")) for r in train],
                   lw=0.8, alpha=0.6, label="train")
    if with_gap:
        loss_axes.plot([r["step"] for r in with_gap],
                       [_number(r.get("train_loss")) for r in with_gap], "s-", ms=4,
                       color="tab:blue", label="train, mean since the last evaluation")
    if evals:
        loss_axes.plot([r["step"] for r in evals], [_number(r.get("val_loss")) for r in evals],
                       "o-", color="tab:orange", label="validation")
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.set_title(title)
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if with_gap:
        gap_axes = axes[1]
        gap_axes.axhline(0.0, color="grey", lw=0.8)
        gap_axes.plot([r["step"] for r in with_gap], [_number(r.get("gap")) for r in with_gap],
                      "o-", color="tab:red")
        gap_axes.set_ylabel("val - train")
        gap_axes.grid(alpha=0.3)
    lr_axes.plot([r["step"] for r in train], [_number(r.get("lr")) for r in train], color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_health(plt, records, title):
    """Two heatmaps (log10 colour scales), parameter groups (embed, h.0 .., head)
    down, steps across: the gradient norm before clipping, and the update's
    size relative to the weights (about 1e-3 is healthy for AdamW). Of more
    than MAX_HEALTH_GROUPS groups, that many are drawn, evenly spaced from the
    first to the last, and the title says so. records: health records that
    read_metrics checked (each series as long as its groups)."""
    import numpy
    all_groups = records[-1]["groups"]
    records = [r for r in records if r.get("groups") == all_groups]
    rows = _evenly_spaced(len(all_groups), MAX_HEALTH_GROUPS)
    groups = [all_groups[i] for i in rows]
    if len(groups) < len(all_groups):
        title += f" ({len(groups)} of {len(all_groups):,} groups, evenly spaced)"
    # a record's cell spans the steps since the one before, so the axis ends at the last
    # record's step; the first cell is as wide as the second (reaches step 0 when alone)
    steps = [r["step"] for r in records]
    width = steps[1] - steps[0] if len(steps) > 1 else steps[0]
    edges = numpy.array([max(0, steps[0] - width)] + steps, dtype=float)
    fig, axes = plt.subplots(2, 1, figsize=(9, 1.2 + 0.35 * len(groups) * 2 + 1), sharex=True)
    for ax, key, label in ((axes[0], "grad_norm", "log10 gradient norm"),
                           (axes[1], "update_ratio", "log10 |update| / |weights|")):
        values = numpy.array([[_number(r[key][i]) for i in rows] for r in records]).T   # (groups, steps)
        with numpy.errstate(divide="ignore", invalid="ignore"):
            image = ax.pcolormesh(edges, numpy.arange(len(groups) + 1), numpy.log10(values),
                                  cmap="viridis", shading="flat")
        ax.set_yticks(numpy.arange(len(groups)) + 0.5)
        ax.set_yticklabels([g if len(g) <= 30 else g[:29] + "…" for g in groups])
        ax.invert_yaxis()
        fig.colorbar(image, ax=ax, label=label)
    axes[0].set_title(title)
    axes[1].set_xlabel("step")
    fig.tight_layout()
    return fig


def _evenly_spaced(count, most):
    """Indices of at most `most` of `count` items, evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _number(value):
    """A logged value as a float; a skipped step's null becomes a gap in the line."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
