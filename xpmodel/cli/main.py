"""The `xpmodel` command line.

Every failure xpmodel foresees is one line on stderr, `error: ...`, with exit
code 2 for usage and config mistakes and 1 for runtime failures; `--debug`
shows the traceback instead. A training run stopped by Ctrl-C, SIGTERM or
SIGHUP saves a checkpoint, says where on stderr and exits with 130, 143 or 129.

SIGTERM keeps its default action outside the training loop: the tokenizer's
forked workers inherit it, and a Python-level handler could leave a worker
that is blocked in C unkillable by its pool.
"""
import argparse
import os
import re
import sys

from .. import __version__
from ..atomic import forget_outputs
from ..errors import XpmodelError, one_line, shown_path

# A quoted string in an argparse message: the value typed, as repr shows it.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" r'|"(?:[^"\\]|\\.)*"')
_MAX_QUOTED = 200

_EPILOG = "Run `xpmodel COMMAND --help` for the options of each command."
_OVERWRITE_FILE = ("replace an existing output file (never one the command reads, nor a run's "
                   "own files)")
_DEVICE = "auto"   # train, sample, eval, doctor and lr-find: the GPU when there is one
_DEVICE_HELP = "cpu, cuda, cuda:N or auto: CUDA when CuPy sees a GPU, else the CPU (default: auto)"


def main(argv=None):
    """Run one command; returns its exit code. Whatever fails, even the error
    handling itself (a MemoryError while describing a MemoryError, say), ends
    as one line on stderr, never a traceback, unless --debug asks for it."""
    debug = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        return _run(parser, args)
    except SystemExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        return _last_resort(exc)
    finally:
        forget_outputs()   # what this command noted as new: a later one notes its own


def _last_resort(exc):
    """Report an exception that escaped the normal handling, with no allocation
    that could fail again."""
    if isinstance(exc, KeyboardInterrupt):
        message, code = "interrupted\n", 130
    elif isinstance(exc, MemoryError):
        message, code = "error: out of memory (run with --debug for the traceback)\n", 1
    else:
        message, code = "error: internal error (run with --debug for the traceback)\n", 1
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
    except BaseException:
        try:
            os.write(2, message.encode())
        except BaseException:
            pass
    return code


def _run(parser, args):
    if not getattr(args, "handler", None):   # no command: a usage error, its help on stderr
        parser.print_help(sys.stderr)
        return 2
    stdout = sys.stdout
    if getattr(args, "outlives_stdout", False):
        sys.stdout = _StdoutOrNothing(stdout)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`xpmodel sample ... | head`): stop quietly. Not
        # training: it outlives its reader (see _StdoutOrNothing).
        _silence_stdout()
        return 0
    except Exception as exc:
        if args.debug:
            raise
        from ..train import Interrupted
        if isinstance(exc, Interrupted):
            print(str(exc), file=sys.stderr)
            return exc.exit_code
        code, message = _describe(exc)
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        sys.stdout = stdout


class _StdoutOrNothing:
    """sys.stdout for a command that must not die with its reader: training
    piped into `head` goes on to its end (its checkpoints, metrics.jsonl and
    the final save) once `head` has gone, its further output sent to
    os.devnull. Errors still reach stderr."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _silence_stdout()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            _silence_stdout()
            try:
                self._stream.flush()   # what was buffered goes to os.devnull
            except (OSError, ValueError):
                pass

    def __getattr__(self, name):   # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _describe(exc):
    """(exit code, one-line message) for an exception."""
    from ..backend import DeviceError
    if isinstance(exc, XpmodelError):
        return exc.exit_code, one_line(exc, 2000)
    if isinstance(exc, DeviceError):
        return 2, one_line(exc, 2000)
    if isinstance(exc, MemoryError):
        # Where memory ran out for a known reason (creating the model, a
        # training step), the message names what to lower; here it is not known.
        return 1, "out of memory (run with --debug to see where)"
    if isinstance(exc, ValueError):
        return 2, one_line(exc, 2000) if str(exc) else exc.__class__.__name__
    if isinstance(exc, OSError):
        if not exc.strerror:
            return 1, one_line(exc, 2000)
        # The reason is kept whole; a path of any length is cut to its two ends.
        where = f"{shown_path(exc.filename)}: " if exc.filename else ""
        return 1, where + one_line(exc.strerror, 300)
    return 1, one_line(f"{exc.__class__.__name__}: {exc}", 2000) + " (run with --debug for the traceback)"


def _train_epilog():
    from ..config import shipped_configs
    import textwrap
    return (textwrap.fill("shipped configs: " + ", ".join(shipped_configs()), 79) + "\n\n"
            "Without --out a run goes to runs/CONFIG_NAME; when that exists, to\n"
            "runs/CONFIG_NAME-2, -3, ... (said at the start). A short run is one override:\n"
            "train.max_iters=60 scales the config's warmup_iters and lr_decay_iters when\n"
            "they are longer than the shortened run (by its new length over its old),\n"
            "unless you set them too; a warmup or decay that fits is kept as it is.")


def path_argument(text):
    """The `type` of every path argument: an empty one is refused (argparse
    names the argument) rather than read as no path at all (`--resume ''`
    would start a new run) or as the current folder (`runs ''`)."""
    return _non_empty(text, "path")


def url_argument(text):
    """The `type` of a URL argument: an empty one is refused, not read as none."""
    return _non_empty(text, "URL")


def _non_empty(text, what):
    if not text:
        raise argparse.ArgumentTypeError(f"an empty {what}")
    return text


class CommandParser(argparse.ArgumentParser):
    """The parser of `xpmodel` and of each of its commands (subparsers take
    their parent's class). A mistake in the arguments is one line on stderr
    naming the command and the argument, exit code 2, with no usage block:

        error: xpmodel sample: argument --top-k: invalid int value: 'x' (xpmodel sample --help lists the options)

    KEY=VALUE arguments may come after options too (`--quiet model.n_layer=2`,
    a sweep's SPECs): they join the command's KEY=VALUE list; any other
    argument left over is refused by the command it was given to."""

    def error(self, message):
        """Exit with `message` on one line, each value quoted in it cut to
        about 200 characters (the choices it lists are kept whole)."""
        message = _QUOTED.sub(lambda value: _cut_quoted(value.group()), message)
        self.exit(2, f"error: {self.prog}: {one_line(message, 2000)} ({self.prog} --help lists "
                     f"the options)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        pairs = [a.dest for a in self._actions if a.metavar in ("KEY=VALUE", "SPEC")]
        if extra and pairs and all("=" in a and not a.startswith("-") for a in extra):
            setattr(namespace, pairs[0], list(getattr(namespace, pairs[0])) + extra)
        elif extra:
            self.error(f"unrecognized arguments: {one_line(' '.join(extra), 200)}")
        return namespace, []


def _cut_quoted(value):
    """A quoted value ('...' or "...") cut to about _MAX_QUOTED characters."""
    if len(value) <= _MAX_QUOTED:
        return value
    return value[:_MAX_QUOTED - 4] + "..." + value[-1]


def build_parser():
    parser = CommandParser(
        prog="xpmodel", epilog=_EPILOG,
        description="Train GPT language models (GPT-2, or Llama-style blocks) with hand-written "
                    "forward and backward passes, on NumPy (CPU) or CuPy (CUDA).")
    parser.add_argument("--version", action="version", version=f"xpmodel {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug keeps what `xpmodel --debug` set.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_training, _add_run_commands, _add_data_commands, _add_hf_commands,
                _add_tuning_commands):
        add(commands, common)
    return parser


def _add_training(commands, common):
    """Train: a new run, a resumed one, or one started from other weights."""
    from . import commands as c
    p = commands.add_parser("train", parents=[common], help="train a model",
                            description="Train a model from a config, or resume a run.",
                            epilog=_train_epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=path_argument, default=None,
                   help="a YAML file or the name of a shipped config (default: default)")
    p.add_argument("--device", default=_DEVICE, help=_DEVICE_HELP)
    p.add_argument("--out", type=path_argument, default=None,
                   help="run directory (default: runs/CONFIG_NAME, or runs/CONFIG_NAME-2, -3, ... "
                        "when that exists; the start says which)")
    p.add_argument("--resume", type=path_argument, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR")
    p.add_argument("--init-from", type=path_argument, default=None, metavar="DIR",
                   help="start from the weights of a run or a Hugging Face GPT-2 or Llama directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (files xpmodel did not write are kept)")
    p.add_argument("--quiet", action="store_true",
                   help="plain log lines, no live display (so without a terminal, and under "
                        "mpirun with several ranks)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.n_layer=4 train.max_iters=200")
    p.set_defaults(handler=c.train_command, outlives_stdout=True)


def _add_run_commands(commands, common):
    """The commands that read a trained run: sample, eval, plot."""
    from . import commands as c
    trained_run = argparse.ArgumentParser(add_help=False)   # options of commands that load a run
    trained_run.add_argument("run_dir", type=path_argument, metavar="RUN_DIR",
                             help="a run directory made by train or import-hf")
    trained_run.add_argument("--device", default=_DEVICE, help=_DEVICE_HELP)
    trained_run.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                             help="which checkpoint to load (default: latest)")
    trained_run.add_argument("--kernels", choices=("fused", "xp"), default="fused",
                             help="on CUDA: the fused kernels, or every layer's own xp code "
                                  "(default: fused)")

    p = commands.add_parser("sample", parents=[common, trained_run], help="generate text from a run",
                            description="Stream generated text from a trained run.")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate per sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only from the K likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only from the likeliest tokens whose probabilities sum to P "
                        "(default: 1, all)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent samples to print (default: 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="a seed from 0 for reproducible samples; sample i uses S + i "
                        "(default: random)")
    p.set_defaults(handler=c.sample_command)

    p = commands.add_parser("eval", parents=[common, trained_run], help="loss, perplexity and bits per byte",
                            description="Evaluate a run on its validation split or on other text.")
    p.add_argument("--data", type=path_argument, default=None, metavar="SOURCE",
                   help="a file, folder, glob or built-in corpus (default: the run's validation split)")
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help=f"batches to evaluate, spread evenly over the text: each holds "
                        f"train.batch_size windows of block_size tokens, or more to make "
                        f"{c.EVAL_TOKENS_PER_BATCH:,} tokens (default: all)")
    p.set_defaults(handler=c.eval_command)

    p = commands.add_parser("plot", parents=[common], help="plot a run's losses to a PNG",
                            description="Plot train/validation loss and learning rate against step.")
    p.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="the run to plot")
    p.add_argument("--out", type=path_argument, default=None, metavar="PNG",
                   help="PNG path (default: RUN_DIR/loss.png); with health records also "
                        "NAME-health.png beside it")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FILE)
    p.set_defaults(handler=c.plot_command)


def _add_data_commands(commands, common):
    """The commands that make token files and tokenizers."""
    from . import commands as c
    p = commands.add_parser("prepare", parents=[common], help="tokenize a corpus into a token file",
                            description="Tokenize a corpus once into a token file that runs reuse.")
    p.add_argument("source", type=path_argument, metavar="SOURCE",
                   help="a file, folder, glob or built-in corpus")
    p.add_argument("--tokenizer", type=path_argument, required=True, metavar="FILE",
                   help="a tokenizer JSON file")
    p.add_argument("--out", type=path_argument, default=None, metavar="FILE",
                   help="token file path, with FILE.json beside it (default: the cache)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FILE)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="encoding processes; more than the cores here is capped to them, with a "
                        "note (default: all cores)")
    p.add_argument("--preview", type=int, nargs="?", const=64, default=None, metavar="N",
                   help="then decode the file's first N tokens (default 64), as ids, text and "
                        "tokens, to check the data")
    p.set_defaults(handler=c.prepare_command)

    p = commands.add_parser("tokenizer", parents=[common], help="tokenizer tools",
                            description="Train a byte-level BPE tokenizer.")
    sub = p.add_subparsers(title="tokenizer commands", metavar="COMMAND")
    q = sub.add_parser("train", parents=[common], help="train a BPE tokenizer on a corpus",
                       description="Learn a byte-level BPE vocabulary from a corpus.")
    q.add_argument("source", type=path_argument, metavar="SOURCE",
                   help="a file, folder, glob or built-in corpus")
    q.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="ids in the vocabulary: 256 bytes + merges + <|endoftext|>")
    q.add_argument("--out", type=path_argument, required=True, metavar="FILE",
                   help="tokenizer JSON file to write")
    q.add_argument("--export-hf", type=path_argument, default=None, metavar="DIR",
                   help="also write Hugging Face tokenizer files to DIR (new or empty; never a "
                        "run or a model folder)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, and write into a non-empty --export-hf "
                        "DIR (its other files are kept); never an input, a run's files or a "
                        "model's")
    q.set_defaults(handler=c.tokenizer_train_command)
    p.set_defaults(handler=lambda args, parser=p: parser.print_help(sys.stderr) or 2)


def _add_hf_commands(commands, common):
    """Hugging Face export and import."""
    from . import commands as c
    p = commands.add_parser("export-hf", parents=[common], help="export a run as a transformers GPT-2 or Llama",
                            description="Write a run as a GPT2LMHeadModel or LlamaForCausalLM directory "
                                        "with its tokenizer (the architecture follows the run's options).")
    p.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="the run to export")
    p.add_argument("out_dir", type=path_argument, metavar="OUT_DIR",
                   help="folder to write (outside the run)")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint to export (default: latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model directory in OUT_DIR that xpmodel did not export "
                        "(an earlier export is replaced without it; other files are refused)")
    p.set_defaults(handler=c.export_hf_command)

    p = commands.add_parser("import-hf", parents=[common], help="turn a GPT-2 or Llama directory into a run",
                            description="Make an xpmodel run from a local Hugging Face GPT-2 or Llama directory "
                                        "(safetensors only).")
    p.add_argument("hf_dir", type=path_argument, metavar="HF_DIR",
                   help="a local GPT-2 or Llama directory (config.json, model.safetensors, "
                        "tokenizer files)")
    p.add_argument("--out", type=path_argument, required=True, metavar="RUN_DIR",
                   help="run directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in RUN_DIR (other files there are kept)")
    p.set_defaults(handler=c.import_hf_command)


def _add_tuning_commands(commands, common):
    """Tuning and diagnosis: doctor, lr-find, runs, compare, sweep."""
    for add in (_add_doctor, _add_lr_find, _add_runs, _add_compare, _add_sweep):
        add(commands, common)


def _add_doctor(commands, common):
    """xpmodel doctor: the debugging checklist as one report."""
    from . import commands as c
    from ..tune.doctor import CHECKS as DOCTOR_CHECKS
    p = commands.add_parser("doctor", parents=[common], help="check a config or run for training bugs",
                            description="The debugging checklist as one report: config and data "
                                        "sanity, the initial loss against ln(V), a non-zero gradient "
                                        "for every parameter, a finite-difference check of a tiny "
                                        "copy of the model, and overfitting one batch. Exits 1 when "
                                        "a check fails.")
    p.add_argument("target", type=path_argument, metavar="CONFIG_OR_RUN",
                   help="a shipped config name, a YAML file, or a run directory")
    p.add_argument("--device", default=_DEVICE, help=_DEVICE_HELP)
    p.add_argument("--overfit-steps", type=int, default=300, metavar="N",
                   help="steps the one-batch overfit check may take (default: 300)")
    p.add_argument("--skip", action="append", default=[], metavar="CHECK", choices=DOCTOR_CHECKS,
                   type=lambda name: name.strip().replace(" ", "-"),
                   help=f"leave a check out (repeatable): {', '.join(DOCTOR_CHECKS)}; "
                        f"e.g. --skip overfit")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(handler=c.doctor_command)


def _add_lr_find(commands, common):
    """xpmodel lr-find: the learning-rate range test."""
    from . import commands as c
    from ..tune.lr_find import MAX_STEPS as LR_FIND_MAX_STEPS, MIN_STEPS as LR_FIND_MIN_STEPS
    p = commands.add_parser("lr-find", parents=[common], help="the learning-rate range test",
                            description="Train from the initial weights with a learning rate "
                                        "growing exponentially, plot loss against learning rate, "
                                        "and suggest train.lr (the rule is printed).")
    p.add_argument("--config", type=path_argument, default=None, metavar="NAME_OR_PATH",
                   help="a shipped config name, a YAML file or a run directory (default: default)")
    p.add_argument("--device", default=_DEVICE, help=_DEVICE_HELP)
    p.add_argument("--steps", type=int, default=200, metavar="N",
                   help=f"steps of the ramp, from {LR_FIND_MIN_STEPS} to {LR_FIND_MAX_STEPS:,} "
                        f"(default: 200)")
    p.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="(default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=1.0, metavar="LR", help="(default: 1)")
    p.add_argument("--out", type=path_argument, default=None, metavar="PNG",
                   help="the plot (default: lr-find-CONFIG.png here); the numbers go beside it "
                        "as .json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PNG image and an earlier lr-find's numbers there "
                        "(never another JSON, a file the command reads, nor a run's own files)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(handler=c.lr_find_command)


def _add_runs(commands, common):
    """xpmodel runs: a table of run directories."""
    from . import commands as c
    p = commands.add_parser("runs", parents=[common], help="list runs: status, steps, best val",
                            description="A table of the run directories in DIR (and up to three "
                                        "folders below): status, steps, tokens, best validation "
                                        "loss and its step, last validation loss, wall time.")
    p.add_argument("dir", type=path_argument, metavar="DIR", nargs="?", default="runs",
                   help="a folder of runs, or one run (default: runs)")
    p.set_defaults(handler=c.runs_command)


def _add_compare(commands, common):
    """xpmodel compare: several runs' curves in one PNG."""
    from . import commands as c
    p = commands.add_parser("compare", parents=[common], help="overlay runs' curves in one PNG",
                            description="Plot the training and validation loss of several runs "
                                        "in one PNG and print a table of them with the config "
                                        "keys that differ.")
    p.add_argument("run_dirs", type=path_argument, metavar="RUN", nargs="+",
                   help="run directories (or folders of runs)")
    p.add_argument("--out", type=path_argument, default="compare.png", metavar="PNG",
                   help="the plot (default: compare.png)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_FILE)
    p.set_defaults(handler=c.compare_command)


def _add_sweep(commands, common):
    """xpmodel sweep: a grid, random or TPE search, or a --preset of them."""
    from . import commands as c
    from ..tune.preset import PRESETS
    from ..tune.study import PRUNERS
    from ..tune.sweep import METRICS
    p = commands.add_parser("sweep", parents=[common],
                            help="grid, random or TPE search over config keys",
                            description="Train one run per trial of a grid, random or (with "
                                        "Optuna) TPE search, resumable (run the same command "
                                        "again after a kill), with median pruning; writes "
                                        "results.csv, results.json, curves.png and best.yaml in "
                                        "--out. SPEC: train.lr=1e-4,3e-4,1e-3 (grid), "
                                        "train.lr=log:1e-5..1e-2, model.n_embd=int:128..512, "
                                        "train.grad_clip=0.5..2 (ranges).")
    p.add_argument("--config", type=path_argument, default="default", metavar="NAME_OR_PATH",
                   help="the base config: a shipped name or a YAML file (default: default)")
    p.add_argument("--out", type=path_argument, required=True, metavar="SWEEP_DIR",
                   help="the sweep's folder")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="trials to run (default: every grid combination, or 8 with ranges)")
    p.add_argument("--max-iters", type=int, default=None, metavar="N",
                   help="train.max_iters of every trial (best.yaml keeps the config's)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="trials at once: CPU threads are split among them, or one GPU each with "
                        "--device cuda (default: 1)")
    p.add_argument("--metric", default="val_loss", choices=METRICS,
                   help="what is minimised: the best validation loss, or the training loss at "
                        "evaluations (default: val_loss)")
    p.add_argument("--device", default="cpu",
                   help="the trials' device, as train takes it: cpu, cuda, cuda:N or auto; with "
                        "--parallel K and CUDA, trial slot i gets GPU i (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default: 0)")
    p.add_argument("--sampler", choices=("grid", "random", "tpe"), default=None,
                   help="grid: every combination of lists; random: ranges drawn at random and "
                        "lists in a random order; tpe: Optuna's TPE, the study in "
                        "SWEEP_DIR/study.db (pip install 'xpmodel[tune]') (default: grid when "
                        "every SPEC is a list, else random)")
    p.add_argument("--pruner", choices=PRUNERS, default=None,
                   help="stop a trial early: median (above the finished trials' median at an "
                        "evaluation), halving (Optuna's successive halving; --sampler tpe), or "
                        "none (default: median)")
    p.add_argument("--storage", default=None, type=url_argument, metavar="URL",
                   help="with --sampler tpe: the study's database, shared by every process "
                        "given the same command (e.g. postgresql://user@host/db; default: "
                        "sqlite:///SWEEP_DIR/study.db)")
    p.add_argument("--no-prune", action="store_true", help="the same as --pruner none")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="tuning-order: stages lr, then batch size, then width, then clipping, "
                        "each fixing the previous stage's winner (SPECs then fix keys)")
    p.add_argument("specs", nargs="*", default=[], metavar="SPEC", help="KEY=VALUES to search")
    p.set_defaults(handler=c.sweep_command)


if __name__ == "__main__":
    sys.exit(main())
