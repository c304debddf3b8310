"""`xpmodel plot`: a run's train and validation loss, and learning rate, against step."""
import os
from pathlib import Path

from .errors import DataError, UsageError
from .rundir import RunDir


def plot_run(run_dir, out=None):
    """Write a PNG of the run's metrics; returns its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("xpmodel plot needs matplotlib: pip install 'xpmodel[plot]'") from None
    run = RunDir(run_dir)
    run.require_run("RUN_DIR")
    records = run.read_metrics()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        raise DataError(f"{run.metrics_path}: no training steps logged yet")
    out = Path(out) if out else run.path / "loss.png"
    fig, (loss_axes, lr_axes) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1]})
    loss_axes.plot([r["step"] for r in train], [_number(r.get("loss")) for r in train],
                   lw=0.8, alpha=0.8, label="train")
    if evals:
        loss_axes.plot([r["step"] for r in evals], [_number(r.get("val_loss")) for r in evals],
                       "o-", label="validation")
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.set_title(f"xpmodel run {run.path.name}")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    lr_axes.plot([r["step"] for r in train], [_number(r.get("lr")) for r in train], color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    fig.tight_layout()
    # Drawn to a temporary file and renamed, so a failure leaves no partial PNG.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _number(value):
    """A logged value as a float; a skipped step's null becomes a gap in the line."""
    return float("nan") if value is None else float(value)
