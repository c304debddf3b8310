"""Soak test: a tiny model trained for many steps with frequent checkpoints,
watching resident memory and the checkpoint folder.

Resident memory (VmRSS from /proc/self/status) is read once the first
`--warmup` steps have run, by when every buffer and cache of a step exists,
and again at the end; it may grow by less than `--max-growth` (default 5%).
The checkpoint folder must hold exactly `keep_last` periodic checkpoints plus
the best one. Exits 1 when either check fails.

    python tools/soak.py [--steps 10000] [--save-interval 50] [--data FILE] [--out DIR]
"""
import random
import sys
import tempfile
import time
from pathlib import Path

from cli_args import ArgumentParser, positive_float, positive_int


def resident_kib(field="VmRSS"):
    """Resident set size (or its peak, field="VmHWM") of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def write_corpus(path, lines=20000, seed=0):
    words = ("the king shall speak of love and war to my lord good night sweet prince "
             "what is this fair day come hither now").split()
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                              for _ in range(lines)) + "\n")
    return path


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=10_000)
    parser.add_argument("--save-interval", type=positive_int, default=50)
    parser.add_argument("--eval-interval", type=positive_int, default=500)
    parser.add_argument("--keep-last", type=positive_int, default=3)
    parser.add_argument("--warmup", type=positive_int, default=200,
                        help="steps before the first reading (fewer than --steps)")
    parser.add_argument("--max-growth", type=positive_float, default=0.05)
    parser.add_argument("--data", default=None, help="a text file (default: generated text)")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--overwrite", action="store_true", help="let --out replace an existing run")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}: "
                     f"memory is read after the warmup and again at the end")
    if args.out and Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out}: it exists; --overwrite replaces it")

    from xpmodel.config import load_config
    from xpmodel.train import Trainer

    scratch = tempfile.TemporaryDirectory(prefix="xpmodel-soak-")
    root = Path(scratch.name)
    data = Path(args.data) if args.data else write_corpus(root / "corpus.txt")
    out = Path(args.out) if args.out else root / "run"
    config = load_config(Path(__file__).resolve().parent.parent / "tests" / "tiny-run.yaml", [
        f"data.source={data}", f"data.cache_dir={root / 'cache'}",
        f"train.max_iters={args.steps}", f"train.save_interval={args.save_interval}",
        f"train.eval_interval={args.eval_interval}", f"train.keep_last={args.keep_last}",
        f"train.warmup_iters={min(100, args.steps // 10)}", f"train.log_interval={args.steps}"])
    trainer = Trainer.start(config, device="cpu", out=out, overwrite=args.overwrite, show=False)

    readings = {}
    one_step = trainer._train_step
    started = time.perf_counter()

    def measured_step():
        result = one_step()
        step = trainer.step + 1
        if step == args.warmup or step == args.steps:
            readings[step] = resident_kib()
        if step % 1000 == 0:
            print(f"step {step}/{args.steps}: {resident_kib() / 1024:.1f} MiB resident, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        return result

    trainer._train_step = measured_step
    summary = trainer.run()

    start, end = readings[args.warmup], readings[args.steps]
    growth = (end - start) / start
    kept = sorted(p.name for p in trainer.run_dir.checkpoint_dir.iterdir())
    periodic = [name for name in kept if name.startswith("step-")]
    saves = args.steps // args.save_interval
    print(f"{summary['steps']} steps in {time.perf_counter() - started:.0f} s, "
          f"{saves} periodic checkpoints written, final loss {summary['train_loss']:.4f}")
    print(f"resident memory: {start / 1024:.1f} MiB at step {args.warmup}, "
          f"{end / 1024:.1f} MiB at step {args.steps} ({100 * growth:+.2f}%), "
          f"peak {resident_kib('VmHWM') / 1024:.1f} MiB")
    print(f"checkpoints kept: {len(kept)} ({', '.join(kept)})")
    failures = []
    if growth >= args.max_growth:
        failures.append(f"resident memory grew {100 * growth:.1f}%, limit {100 * args.max_growth:g}%")
    if len(periodic) != args.keep_last or "best.safetensors" not in kept or len(kept) != args.keep_last + 1:
        failures.append(f"expected {args.keep_last} periodic checkpoints and best.safetensors")
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("OK")
    scratch.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
