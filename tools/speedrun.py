"""Time to a target validation loss: named recipes trained until they first
reach it, on the same data, batches and machine, back to back.

    python tools/speedrun.py                                   # CPU, every recipe, target 1.88
    python tools/speedrun.py --recipes gpt2-adamw speedrun --repeats 3 --json speedrun.json
    python tools/speedrun.py --size gpu --device cuda          # shakespeare-char size, target 1.47
    python tools/speedrun.py --size bpe-cpu                    # Python source, 4096-token BPE

A recipe is a shipped config (plus overrides) run by an engine; the sizes are
cpu and gpu (Tiny Shakespeare as bytes) and bpe-cpu and bpe-gpu (the built-in
`pystdlib` corpus with a learned 4096-token BPE):

  gpt2-adamw        xpmodel  shakespeare-char-cpu | shakespeare-char     GPT-2 + AdamW (today's)
                             pystdlib-cpu | pystdlib
  llama-adamw       xpmodel  llama-char-cpu | llama-char                  Llama-style block + AdamW
                             gpt2-adamw's BPE configs + the Llama-style block
  llama-muon        xpmodel  the same + train.optimizer=muon              Llama-style + Muon, defaults
  speedrun          xpmodel  speedrun-char-cpu | speedrun-char            the shipped fastest recipe
                             speedrun-pystdlib-cpu | speedrun-pystdlib
  torch-gpt2-adamw  PyTorch  gpt2-adamw's config in tools/torch_gpt.py    the reference

Targets: 1.88 (cpu), 1.47 (gpu, nanoGPT's result), 4.40 (bpe-cpu, a little
above what gpt2-adamw reaches at the end of its schedule, as 1.88 is for
cpu). bpe-gpu has no measured target yet, so its default is `--target
baseline`: the first gpt2-adamw run trains its whole schedule, and the loss on
the whole validation split at its end becomes the target of every run after it.

Every run starts from the same weights (xpmodel's initialisation, copied into
PyTorch) and draws the same training batches (xpmodel's random windows of the
config's corpus: Tiny Shakespeare as bytes by default for the char sizes,
--data names another file; pystdlib for the bpe sizes).
The step is the trainer's: grad_accum micro-batches, global-norm clip, the
optimizer at the schedule's rate (and fp16 loss scaling where the config asks).

Evaluation decides the crossing: every --eval-every steps (every 10 once the
estimate is within 0.1 of the target) the loss on 20 batches spread evenly over
the validation split. The loss on the whole validation split (every window of
T tokens, one after another) decides: it is measured once when the estimate
first comes within 0.1 of the target, to learn how far the estimate is off
(on code the 20 batches read up to 0.06 high), and from then on at every
evaluation where the estimate corrected by the last such difference is within
0.02 of the target. A run that does not cross by 1.5x its
config's max_iters is reported as not reaching the target. Evaluation time is
not training time: "train s" counts only the steps (the device synchronised at
each evaluation), "wall s" everything after setup.

Each run is its own process (`--run RECIPE`), so thread pools and imports do
not carry over; with --repeats the recipes are interleaved (every recipe once,
then again) and the table shows the median run of each. The JSON holds every
run with its evaluation curve.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

GPT2_CONFIGS = {"cpu": "shakespeare-char-cpu", "gpu": "shakespeare-char",
                "bpe-cpu": "pystdlib-cpu", "bpe-gpu": "pystdlib"}
# The Llama-style block of llama-char-cpu / llama-char, for the BPE configs
# that have no Llama-style twin of their own.
LLAMA_BLOCK = ("model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu",
               "model.n_kv_head=2", "model.bias=false")
LLAMA_CONFIGS = {"cpu": "llama-char-cpu", "gpu": "llama-char",
                 "bpe-cpu": ("pystdlib-cpu", LLAMA_BLOCK), "bpe-gpu": ("pystdlib", LLAMA_BLOCK)}
# name -> (engine, {size: config or (config, overrides)}, overrides)
RECIPES = {
    "gpt2-adamw": ("xpmodel", GPT2_CONFIGS, []),
    "llama-adamw": ("xpmodel", LLAMA_CONFIGS, []),
    "llama-muon": ("xpmodel", LLAMA_CONFIGS, ["train.optimizer=muon"]),
    "speedrun": ("xpmodel", {"cpu": "speedrun-char-cpu", "gpu": "speedrun-char",
                             "bpe-cpu": "speedrun-pystdlib-cpu", "bpe-gpu": "speedrun-pystdlib"}, []),
    "torch-gpt2-adamw": ("torch", GPT2_CONFIGS, []),
}
SIZES = tuple(GPT2_CONFIGS)
# "baseline": the baseline's loss at the end of its schedule is the target (see above)
TARGETS = {"cpu": 1.88, "gpu": 1.47, "bpe-cpu": 4.40, "bpe-gpu": "baseline"}
BASELINE = "gpt2-adamw"
QUICK_EVAL_BATCHES = 20
NEAR = 0.1           # estimate within this of the target: evaluate every FINE_EVAL_EVERY steps
SLACK = 0.02         # corrected estimate within this of the target: measure the whole split
FINE_EVAL_EVERY = 10
OVERRUN = 1.5        # give up at this multiple of the config's max_iters


# ---- one run ----------------------------------------------------------------------

def recipe_config(name, size):
    """(config name, overrides) of recipe `name` at `size`."""
    _, configs, overrides = RECIPES[name]
    config = configs[size]
    config, size_overrides = (config, ()) if isinstance(config, str) else config
    return config, [*size_overrides, *overrides]


def load_recipe(name, size, data, overrides=()):
    from xpmodel.config import load_config
    config, recipe_overrides = recipe_config(name, size)
    settings = [*recipe_overrides, *overrides]
    if data:
        settings.append(f"data.source={data}")
    return load_config(config, settings)


def full_split_windows(tokens, T):
    """(inputs, targets) of every whole window of T tokens, one after another."""
    n = (len(tokens) - 1) // T
    x = np.asarray(tokens[:n * T], dtype=np.int64).reshape(n, T)
    y = np.asarray(tokens[1:n * T + 1], dtype=np.int64).reshape(n, T)
    return x, y


class XpmodelEngine:
    """The trainer's step on an xpmodel GPT (see Trainer._optimizer_step)."""

    def __init__(self, config, vocab_size, device):
        import xpmodel
        from xpmodel.train.loss_scale import LossScaler
        from xpmodel.model.config import gpt_config
        from xpmodel.train.setup import optimizer_for
        t = config.train
        self.xpmodel, self.config = xpmodel, config
        self.model = xpmodel.GPT(gpt_config(config.model, vocab_size), device=device, seed=t.seed,
                                 precision=t.precision)
        self.optimizer = optimizer_for(self.model, t)
        self.scaler = LossScaler(xp=self.model.xp) if t.precision == "fp16" else None

    def initial_weights(self):
        return self.model.state_arrays()

    def step(self, lr, batches):
        from xpmodel.train.optim import clipped_step
        t, model = self.config.train, self.model
        self.optimizer.lr = lr
        model.zero_grad()
        scale = self.scaler.device_scale if self.scaler else 1.0
        for x, y in batches:
            model.forward_backward(x, y, scale=scale / len(batches))
        _, finite = clipped_step(self.optimizer, t.grad_clip, scale)
        if self.scaler:
            self.scaler.record(finite)

    def loss(self, batches):
        """Mean loss over (x, y) batches, weighted by their sizes."""
        self.model.eval()
        total = sum(float(self.model.loss(x, y)) * x.shape[0] for x, y in batches)
        self.model.train()
        return total / sum(x.shape[0] for x, _ in batches)

    def synchronize(self):
        from xpmodel.backend import synchronize
        synchronize(self.model.device)


class TorchEngine:
    """The same recipe in PyTorch eager (tools/torch_gpt.py), fp32, fused attention."""

    def __init__(self, config, vocab_size, device, weights):
        import torch
        from xpmodel.model.config import gpt_config
        from torch_gpt import torch_adamw, torch_params
        if config.train.precision != "fp32":
            raise SystemExit("the PyTorch engine runs fp32 recipes only")
        t = config.train
        self.torch, self.config = torch, config
        self.gpt = gpt_config(config.model, vocab_size)
        self.device = "cuda" if str(device).startswith("cuda") else "cpu"
        self.params = torch_params(weights, device=self.device)
        self.optimizer = torch_adamw(self.params, t.lr, (t.beta1, t.beta2), t.eps, t.weight_decay,
                                     fused=True if self.device == "cuda" else None)

    def step(self, lr, batches):
        from torch_gpt import torch_loss
        torch, t = self.torch, self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        for x, y in batches:
            loss = torch_loss(self.params, self._tensor(x), self._tensor(y), self.gpt,
                              dropout=self.gpt.dropout, training=True, fused_attention=True)
            (loss / len(batches)).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), t.grad_clip)
        self.optimizer.step()

    def loss(self, batches):
        from torch_gpt import torch_loss
        with self.torch.no_grad():
            total = sum(torch_loss(self.params, self._tensor(x), self._tensor(y), self.gpt,
                                   fused_attention=True).item() * x.shape[0] for x, y in batches)
        return total / sum(x.shape[0] for x, _ in batches)

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _tensor(self, array):
        return self.torch.from_numpy(np.asarray(array, dtype=np.int64)).to(self.device)


def run_one(name, size, target, data, device, eval_every, threads, overrides=()):
    """Train recipe `name` until it crosses `target`; returns the result dict.
    With no target, train the config's whole schedule and measure the whole
    validation split at its end: that loss is then the target."""
    sys.path.insert(0, str(TOOLS))
    from xpmodel.data.corpus import build_tokenizer, load_tokens
    from xpmodel.data import RandomWindowSampler
    from xpmodel.train import make_schedule
    config = load_recipe(name, size, data, overrides)
    engine_name = RECIPES[name][0]
    t, T = config.train, config.model.block_size
    tokenizer = build_tokenizer(config.data, say=lambda text: None)
    train_tokens, val_tokens = load_tokens(config.data, tokenizer, T, show_progress=False)
    sampler = RandomWindowSampler(train_tokens, t.batch_size, T, t.seed, token_dropout=0.0,
                                  vocab_size=tokenizer.vocab_size)
    xp_engine = XpmodelEngine(config, tokenizer.vocab_size, device)
    if engine_name == "torch":
        import torch
        torch.set_num_threads(threads)
        engine = TorchEngine(config, tokenizer.vocab_size, device, xp_engine.initial_weights())
        del xp_engine
    else:
        engine = xp_engine
    schedule = make_schedule(t, t.max_iters)
    from xpmodel.data import eval_batches
    quick = list(eval_batches(val_tokens, t.batch_size, T, QUICK_EVAL_BATCHES))
    full_x, full_y = full_split_windows(val_tokens, T)
    full = [(full_x[i:i + 64], full_y[i:i + 64]) for i in range(0, len(full_x), 64)]
    tokens_per_step = t.batch_size * t.grad_accum * T

    curve, crossing = [], None
    bias = 0.0           # the whole split's loss minus the estimate, when last measured
    calibrated = False   # whether the whole split has been measured yet
    train_time, step, next_eval = 0.0, 0, eval_every
    max_steps = int(math.ceil(OVERRUN * t.max_iters)) if target is not None else t.max_iters
    wall_start = time.perf_counter()
    segment_start = time.perf_counter()
    while step < max_steps:
        batches = [sampler.next_batch() for _ in range(t.grad_accum)]
        engine.step(schedule(step), batches)
        step += 1
        if step < next_eval and step < max_steps:
            continue
        engine.synchronize()
        train_time += time.perf_counter() - segment_start
        estimate = engine.loss(quick)
        point = {"step": step, "train_s": round(train_time, 3), "val_estimate": round(estimate, 4)}
        near = target is not None and estimate + bias <= target + NEAR
        if target is None:
            measure_full = step == max_steps
        else:
            measure_full = estimate + bias <= target + SLACK or (near and not calibrated)
        if measure_full:
            point["val_full"] = round(engine.loss(full), 4)
            bias, calibrated = point["val_full"] - estimate, True
            target = point["val_full"] if target is None else target
        curve.append(point)
        if not math.isfinite(estimate):
            break
        if target is not None and point.get("val_full", math.inf) <= target:
            crossing = point
            break
        next_eval = step + (FINE_EVAL_EVERY if near else eval_every)
        segment_start = time.perf_counter()
    wall = time.perf_counter() - wall_start
    last = curve[-1]
    config_name, recipe_overrides = recipe_config(name, size)
    return {"recipe": name, "engine": engine_name, "config": config_name,
            "overrides": [*recipe_overrides, *overrides], "target": target,
            "reached": crossing is not None, "steps": last["step"],
            "tokens": last["step"] * tokens_per_step, "train_s": last["train_s"], "wall_s": round(wall, 2),
            "val_estimate": last["val_estimate"], "val_full": last.get("val_full"),
            "ms_per_step": round(1000 * last["train_s"] / last["step"], 2), "curve": curve}


# ---- many runs --------------------------------------------------------------------

def machine():
    info = {"python": platform.python_version(), "cores": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                            if line.startswith("Model name")), platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def median_runs(runs):
    """recipe -> its median run by training time (unreached runs count as slowest)."""
    by_recipe = {}
    for run in runs:
        by_recipe.setdefault(run["recipe"], []).append(run)
    result = {}
    for name, group in by_recipe.items():
        ordered = sorted(group, key=lambda r: (not r["reached"], r["train_s"]))
        result[name] = dict(ordered[(len(ordered) - 1) // 2],
                            train_s_all=[r["train_s"] for r in group],
                            train_s_median=statistics.median(r["train_s"] for r in group))
    return result


def table(medians, baseline="gpt2-adamw"):
    base = medians.get(baseline)
    lines = [f"{'recipe':18} {'reached':>7} {'steps':>6} {'tokens':>10} {'train s':>8} "
             f"{'ms/step':>8} {'val (full)':>10} {'vs ' + baseline:>16}  runs (train s)"]
    for name, r in medians.items():
        ratio = f"{r['train_s_median'] / base['train_s_median']:.2f}x" \
            if base and base["reached"] and r["reached"] else "-"
        val = r["val_full"] if r["val_full"] is not None else r["val_estimate"]
        lines.append(f"{name:18} {'yes' if r['reached'] else 'no':>7} {r['steps']:>6} "
                     f"{r['tokens']:>10,} {r['train_s_median']:>8.1f} "
                     f"{1000 * r['train_s_median'] / r['steps']:>8.1f} "
                     f"{val:>10.4f} {ratio:>16}  "
                     f"{', '.join(f'{s:.1f}' for s in r['train_s_all'])}")
    return "\n".join(lines)


def target_value(text):
    """--target: a validation loss, or `baseline`."""
    if text == "baseline":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a loss nor `baseline`") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--size", choices=SIZES, default="cpu",
                        help="cpu: the *-char-cpu configs, target 1.88; gpu: the *-char ones, 1.47; "
                             "bpe-cpu / bpe-gpu: the pystdlib ones, 4.40 / the baseline's end")
    parser.add_argument("--target", type=target_value,
                        help="validation loss to reach, or `baseline` (default by --size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", help="the corpus (default: for the char sizes Tiny Shakespeare "
                                       "from ../shared/data where it is, else the configs' own)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="PyTorch's threads (xpmodel uses every core it may run on)")
    parser.add_argument("--json", help="write every run and the machine here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every xpmodel recipe (for tuning)")
    parser.add_argument("--run", help=argparse.SUPPRESS)       # one run, in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    target = TARGETS[args.size] if args.target is None else args.target
    target = None if target == "baseline" else target       # None: the baseline's run sets it
    if args.data is None and not args.size.startswith("bpe") and DEFAULT_DATA.exists():
        args.data = str(DEFAULT_DATA)

    if args.run:
        overrides = args.set if RECIPES[args.run][0] == "xpmodel" else []
        result = run_one(args.run, args.size, target, args.data, args.device, args.eval_every,
                         args.threads, overrides)
        Path(args.result).write_text(json.dumps(result))
        return

    if target is None:      # the baseline's first run sets the target: it goes first
        if BASELINE not in args.recipes:
            parser.error(f"--target baseline needs the {BASELINE} recipe")
        args.recipes = [BASELINE] + [name for name in args.recipes if name != BASELINE]
    runs = []
    for repeat in range(args.repeats):
        for name in args.recipes:
            result_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"speedrun-{os.getpid()}-{name}.json"
            command = [sys.executable, __file__, "--run", name, "--result", str(result_path),
                       "--size", args.size, "--target", "baseline" if target is None else str(target),
                       "--device", args.device, "--eval-every", str(args.eval_every),
                       "--threads", str(args.threads)]
            if args.data:
                command += ["--data", args.data]
            if args.set:
                command += ["--set", *args.set]
            done = subprocess.run(command)
            if done.returncode != 0:
                raise SystemExit(f"{name}: the run failed (exit {done.returncode})")
            result = json.loads(result_path.read_text())
            result_path.unlink()
            result["repeat"] = repeat
            runs.append(result)
            if target is None:
                target = result["target"]
                print(f"{name} ended its schedule at val loss {target} (whole validation split): "
                      f"the target of every run", flush=True)
            print(f"[{repeat + 1}/{args.repeats}] {name}: "
                  f"{'reached' if result['reached'] else 'did not reach'} {target} at step "
                  f"{result['steps']} after {result['train_s']:.1f} s of training "
                  f"({result['ms_per_step']:.1f} ms/step)", flush=True)
    medians = median_runs(runs)
    about = machine()
    print(f"\ntime to val loss {target} ({args.size} size, {args.device}; {about['cpu']}, "
          f"{about['cores']} cores, load average {about.get('load_average')}, {about['date']})")
    print(table(medians))
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "size": args.size, "device": args.device,
                                               "machine": about, "runs": runs,
                                               "median": {k: {key: v for key, v in r.items() if key != "curve"}
                                                          for k, r in medians.items()}}, indent=1))


if __name__ == "__main__":
    main()
