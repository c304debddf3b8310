"""Choosing and chaining sweeps: `open_sweep` picks a grid or random Sweep
(sweep.py) or an Optuna one (study.py) from the command line's strategy, and
`run_preset` runs `--preset tuning-order`, one sweep per stage.

This module imports both kinds of sweep, so neither has to import the other."""
import os
from pathlib import Path

from ..config import load_config, load_config_and_files, save_config
from ..errors import UsageError, XpmodelError
from ..train.outputs import check_output
from .study import OptunaSweep
from .sweep import Sweep, params_text
from .sweep_plan import check_trial_inputs, format_value, parse_spec

PRESETS = ("tuning-order",)


def sweep_strategy(sampler=None, pruner=None, storage=None, no_prune=False):
    """open_sweep's sampler, pruner and storage from --sampler, --pruner, --storage
    and --no-prune."""
    if no_prune and pruner not in (None, "none"):
        raise UsageError(f"--no-prune and --pruner {pruner} contradict each other")
    return {"sampler": sampler, "storage": storage,
            "pruner": "none" if no_prune else (pruner or "median")}


def open_sweep(out, config, specs, sampler=None, pruner="median", storage=None, **kwargs):
    """A Sweep, or an OptunaSweep with --sampler tpe; kwargs are Sweep's."""
    if sampler == "tpe":
        return OptunaSweep(out, config, specs, storage=storage, pruner=pruner, **kwargs)
    if storage:
        raise UsageError("--storage holds an Optuna study: it needs --sampler tpe")
    if pruner not in ("median", "none"):
        raise UsageError(f"--pruner {pruner} is Optuna's: it needs --sampler tpe (the grid and "
                         f"random search prune by the median rule, or not at all with --pruner none)")
    return Sweep(out, config, specs, sampler=sampler, prune=pruner == "median", **kwargs)


# ---- --preset tuning-order -------------------------------------------------------------

def tuning_order_stages(config):
    """[(stage name, [SPEC], key whose largest finished value wins or None)] for a
    RunConfig: the guide's order, each around the config's current value."""
    t, m = config.train, config.model
    lrs = ",".join(format_value(t.lr * f) for f in (0.1, 0.3, 1.0, 3.0, 10.0))
    batches = ",".join(str(t.batch_size * f) for f in (1, 2, 4))
    step = m.n_head * (2 if m.position == "rope" else 1)
    widths = sorted({max(step, round(m.n_embd * f / step) * step) for f in (0.5, 1.0, 2.0)})
    return [("1-lr", [f"train.lr={lrs}"], None),
            ("2-batch", [f"train.batch_size={batches}"], "train.batch_size"),
            ("3-width", [f"model.n_embd={','.join(map(str, widths))}"], None),
            ("4-clip", ["train.grad_clip=0,0.5,1,2"], None)]


def run_preset(out, config, specs=(), **options):
    """`--preset tuning-order`: learning rate, then the largest batch size that
    fits, then width, then clipping, each stage a sweep in OUT/N-name starting
    from the previous stage's best.yaml. `specs` fix one value each in every
    stage: a stage leaves out a key they fix, and a stage left with nothing to
    search is skipped. `options` are open_sweep's (max_iters, parallel, metric,
    device, seed, and sweep_strategy's). Resumable as one sweep is."""
    out = Path(out)
    fixed, held = list(specs), {}
    for spec in fixed:
        param = parse_spec(spec)
        if param.kind != "grid" or len(param.values) != 1:
            raise UsageError(f"with --preset, SPECs fix one value each (KEY=VALUE); got {spec}")
        held[param.key] = format_value(param.values[0])
    base, inputs = load_config_and_files(config, fixed)
    stages = tuning_order_stages(base)
    searched = [name for name, stage_specs, _ in stages if _searched(stage_specs, held)]
    if not searched:
        tuned = [spec.partition("=")[0] for _, stage_specs, _ in stages for spec in stage_specs]
        raise UsageError(f"--preset tuning-order: the SPECs fix every key it tunes "
                         f"({', '.join(tuned)}); leave one of them to search")
    _check_stage_values(stages, held)
    check_output(out / "best.yaml", "--out", inputs, overwrite=True)
    # OUT/best.yaml is replaced only where an earlier run of this preset wrote it
    if os.path.lexists(out / "best.yaml") and not os.path.lexists(out / searched[0]):
        raise UsageError(f"--out {out}: holds a best.yaml that no --preset run wrote there; "
                         f"xpmodel will not replace it: choose another --out")
    check_trial_inputs(base, [])        # before any stage says it starts
    for i, (name, stage_specs, _) in enumerate(stages):
        if name not in searched:
            keys = [spec.partition("=")[0] for spec in stage_specs]
            print(f"stage {name}: skipped: the SPECs fix "
                  f"{', '.join(f'{key}={held[key]}' for key in keys)}", flush=True)
            continue
        if name != searched[0]:     # the stage starts from the previous stage's best.yaml
            base = load_config(config, fixed)
        _, stage_specs, largest = tuning_order_stages(base)[i]
        stage_specs = _searched(stage_specs, held)
        print(f"stage {name}: {' '.join(stage_specs)} (from {config})", flush=True)
        sweep = open_sweep(out / name, config, stage_specs + fixed, largest=largest, **options)
        results = sweep.run()
        print("\n".join(sweep.table()), flush=True)
        if not results["best"]:
            raise XpmodelError(f"stage {name}: no trial finished; see the logs in "
                               f"{out / name / 'logs'}")
        print(f"stage {name} winner: {params_text(results['best_params'])}"
              f"{_rule(results, largest)}", flush=True)
        config = str(out / name / "best.yaml")
    save_config(load_config(config), out / "best.yaml")
    print(f"best config: {out / 'best.yaml'} (xpmodel train --config {out / 'best.yaml'})")
    return 0


def _searched(stage_specs, held):
    """A stage's SPECs less those of the keys in `held`, which the preset's SPECs fix."""
    return [spec for spec in stage_specs if spec.partition("=")[0] not in held]


def _check_stage_values(stages, held):
    """Refuse, before the first stage runs, a value a stage would search that
    its key cannot take (4x a batch_size past MAX_BATCH_SIZE, say). A stage's
    values come from its own key in the config the preset starts from, which
    no earlier stage changes, and are made to suit the keys they relate to
    (widths are multiples of n_head); each trial is checked whole when its
    stage starts."""
    for name, stage_specs, _ in stages:
        for spec in _searched(stage_specs, held):
            try:
                parse_spec(spec)
            except UsageError as exc:
                raise UsageError(f"--preset tuning-order, stage {name}: {exc}; give "
                                 f"{spec.partition('=')[0]}=VALUE to hold it fixed") from None


def _rule(results, largest):
    """How a stage that keeps the largest finished value of `largest` chose its
    winner, naming the value with the best metric where that is another."""
    if largest is None:
        return ""
    metric, short = results["metric"], largest.split(".")[-1]
    done = [row for row in results["trials"] if row["status"] == "done" and row[metric] is not None]
    best = min(done, key=lambda row: row[metric])
    if best["trial"] == results["best"]:
        return f" (the largest {short} that finished, and the best {metric})"
    return (f" (the largest {short} that finished; {short}={format_value(best[largest])} had "
            f"the best {metric})")
