"""One-process A/B timing of two checkouts: training steps of the xpmodel
package in another checkout (OLD) and in this one, alternated step by step in
one process, so that a machine's drift falls on both alike. Separate runs of
tools/bench_cpu.py on a shared VM move by up to 20%; this comparison resolves
changes of a few percent. Prints each config's median step time of both and
the ratio new/old (below 1: this checkout is faster).

    git worktree add /tmp/old HEAD~1                 # any folder holding xpmodel/
    python tools/ab_checkouts.py /tmp/old [--configs nano-cpu seed] [--pairs 30]

Both packages build the same model from the same seed and train it on the same
random tokens (bench_cpu.py's step: forward, backward, clip, AdamW). Run it
against this checkout itself for the noise floor: new/old within about 2% on
a 2-core AMD EPYC VM.
"""
import importlib.util
import statistics
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_cpu import CONFIGS, model_config, time_steps, xpmodel_step   # noqa: E402
from cli_args import ArgumentParser, DocstringFormatter, positive_int  # noqa: E402


def load_package(checkout, name):
    """The xpmodel package of `checkout`, imported as `name` (its imports are
    relative, so it runs wholly on its own code)."""
    init = Path(checkout) / "xpmodel" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def step_of(package, name):
    return xpmodel_step(*model_config(name, package), package)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringFormatter)
    parser.add_argument("old", metavar="OLD_CHECKOUT", help="a folder holding an xpmodel/ package")
    parser.add_argument("--configs", nargs="+", default=["nano-cpu", "seed"], choices=list(CONFIGS))
    parser.add_argument("--pairs", type=positive_int, default=30,
                        help="timed steps of each side, alternated (the order flips every pair)")
    args = parser.parse_args()
    if not (Path(args.old) / "xpmodel" / "__init__.py").is_file():
        parser.error(f"OLD_CHECKOUT {args.old}: holds no xpmodel/__init__.py")
    old = load_package(args.old, "xpmodel_ab_old")
    import xpmodel as new
    print(f"old: {Path(old.__file__).parent}\nnew: {Path(new.__file__).parent}")
    for name in args.configs:
        sides = {"old": step_of(old, name), "new": step_of(new, name)}
        for step in sides.values():
            time_steps(step, 2)                            # warm up
        times = {side: [] for side in sides}
        for pair in range(args.pairs):
            for side in (("old", "new") if pair % 2 else ("new", "old")):
                times[side] += time_steps(sides[side], 1)
        old_ms, new_ms = (1e3 * statistics.median(times[side]) for side in ("old", "new"))
        print(f"{name:14s} old {old_ms:8.2f} ms  new {new_ms:8.2f} ms  new/old {new_ms / old_ms:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
