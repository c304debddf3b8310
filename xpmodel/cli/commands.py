"""What each `xpmodel` subcommand does; main.py only parses arguments."""
import math
import os
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

from ..atomic import atomic_writer
from ..config.sections import MAX_SEED, names_tokenizer_file
from ..cpu_threads import usable_cores
from ..errors import DataError, UsageError, quote
from ..files import existing_file, inside, overlaps, same_file
from ..interrupts import deferred_signals
from ..train.display import perplexity_text
from ..train.outputs import check_output, check_output_dir
from .inputs import refuse_model_folder

EVAL_TOKENS_PER_BATCH = 4096


def train_command(args):
    from ..distributed import init_distributed
    from ..train import Interrupted
    dist = init_distributed(args.device)
    if dist.world_size == 1:
        return _train(args, args.device, None)
    # Several ranks: any failure on one rank ends the whole job at once.
    with dist.abort_on_error():
        try:
            return _train(args, dist.device_spec, dist)
        except Interrupted as stop:
            dist.abort(str(stop), stop.exit_code)


def _resume(args, device, dist, quiet):
    """train --resume RUN_DIR, with the train.* overrides given."""
    from contextlib import nullcontext
    from ..config import save_config
    from ..train import Trainer
    from ..train.rundir import RunDir
    if args.config or args.init_from or args.out or args.overwrite:
        raise UsageError("--resume RUN_DIR takes its config from the run and writes only there; "
                         "drop --config, --init-from, --out and --overwrite (KEY=VALUE may change "
                         "train.* settings)")
    refuse_model_folder(args.resume, "--resume")
    run = RunDir(args.resume)
    run.require_run("--resume")
    is_main = dist is None or dist.is_main
    with run.lock("--resume") if is_main else nullcontext():
        checkpoints = list(run.checkpoints_newest_first())   # each header read once
        config = _resume_config(run, args, checkpoints, notify=print if is_main else None)
        trainer = Trainer.resume(args.resume, device=device, overrides_config=config,
                                 quiet=quiet, dist=dist, checkpoints=checkpoints)
        if config is not None and is_main and trainer.step < trainer.total_steps:
            save_config(config, run.config_path)   # kept only by a resume that trains
        _print_header(trainer)
        trainer.run()
    return 0


def _train(args, device, dist):
    from contextlib import nullcontext
    from ..config import load_config_and_files
    from ..train import Trainer
    from ..train.rundir import RunDir, default_run_path
    from ..backend import get_device
    from ..data.corpus import run_cache_root
    from ..data.sources import resolve_given
    from ..train.setup import (absolute_source, check_out_outside_corpus,
                               check_out_outside_init_from)
    is_main = dist is None or dist.is_main
    get_device(device)   # a bad --device is named before anything is read or chosen
    # Open MPI gives every rank a terminal even when the job writes to a log: several ranks print
    # plain lines, as --quiet does.
    quiet = args.quiet or dist is not None
    if args.resume:
        return _resume(args, device, dist, quiet)
    if dist is not None and not args.out:
        raise UsageError("under mpirun every rank must name the same run: pass --out RUN_DIR")
    overrides = list(args.overrides)
    if args.init_from and not os.path.exists(args.init_from):
        raise UsageError(f"--init-from {args.init_from}: no such directory")
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    config_name = args.config or "default"
    config, config_files = load_config_and_files(args.config, overrides,
                                                 notify=print if is_main else None)
    config = _with_absolute_init_from(config)
    out = Path(args.out) if args.out else default_run_path(config_name)
    init_from = config.train.init_from
    check_out_outside_init_from(init_from, out)
    for source in config_files:
        if RunDir(out).owns(source):
            raise UsageError(f"--out {out}: holds {source} among its run files, which this "
                             f"command reads (the config or its base); choose another --out")
    # A glob reaching into --out is named first: it may match nothing until the run writes there.
    check_out_outside_corpus(absolute_source(config.data.source), out)
    resolve_given(config.data.source, "data.source")
    if names_tokenizer_file(config.data.tokenizer) and not init_from:
        existing_file(config.data.tokenizer, "data.tokenizer", "tokenizer file")
    run_cache_root(config.data)   # an unusable cache folder is named before the run's folder
    if not args.out and out.name != Path(config_name).stem and is_main:
        print(f"{out.parent / Path(config_name).stem} already exists, so this run goes to {out} "
              f"(--out chooses the folder; --resume continues a run)", flush=True)
    if dist is not None:
        dist.shard(config.train.batch_size)   # refuses a batch the ranks cannot split, before the lock writes
    with RunDir(out).lock("--out") if is_main else nullcontext():
        trainer = Trainer.start(config, device=device, out=out, overwrite=args.overwrite,
                                quiet=quiet, dist=dist, config_name=config_name)
        _print_header(trainer)
        trainer.run()
    return 0


def _with_absolute_init_from(config):
    """`config` with train.init_from as the run records it (absolute_init_from)."""
    from dataclasses import replace
    from ..train.setup import absolute_init_from
    return replace(config, train=replace(config.train,
                                         init_from=absolute_init_from(config.train.init_from)))


def _resume_config(run, args, checkpoints, notify=None):
    """The config a resumed run continues with: the run's own, with KEY=VALUE
    overrides of train.* settings (`notify` gets the notes on a schedule fitted
    to a shorter run); None when nothing is overridden. A config.yaml
    edited by hand to change data.* or model.* settings is refused, and so is a
    train.optimizer other than the one the run's checkpoints (a list of
    run.checkpoints_newest_first()'s) were saved with."""
    from ..config import config_to_dict, load_config
    saved = run.load_config()
    run.check_config_matches_checkpoint(saved, checkpoints)
    config = load_config(run.config_path, args.overrides, notify) if args.overrides else saved
    for section in ("data", "model"):
        if config_to_dict(config)[section] != config_to_dict(saved)[section]:
            way_forward = (f"; to train this run's weights on new data, start a new run with "
                           f"--init-from {args.resume}" if section == "data" else "")
            raise UsageError(f"--resume: only train.* settings can change, not {section}.*"
                             f"{way_forward}")
    for key in ("batch_size", "seed"):
        if getattr(config.train, key) != getattr(saved.train, key):
            raise UsageError(f"--resume: train.{key} cannot change within a run (the data "
                             f"sampler's position depends on it); start a new run with "
                             f"--init-from {args.resume}")
    if config.train.init_from != saved.train.init_from:
        raise UsageError("--resume: train.init_from cannot change: a resumed run goes on from its "
                         "own checkpoints")
    if config.train.epochs and config.train.grad_accum != saved.train.grad_accum:
        raise UsageError(f"--resume: train.grad_accum cannot change in a run sized by "
                         f"train.epochs={config.train.epochs} (its length in steps depends on it); "
                         f"give the length as train.max_iters instead")
    run.check_optimizer_matches_checkpoints(config, checkpoints)
    old, new = saved.train, config.train
    if (notify and old.lr_decay_iters is None and new.lr_decay_iters is None
            and new.schedule != "constant" and old.max_iters and new.max_iters
            and new.max_iters > old.max_iters):
        notify(f"note: train.lr_decay_iters is null (the run's length), so the learning-rate "
               f"schedule now spans {new.max_iters:,} steps instead of {old.max_iters:,}, from "
               f"its first step; to extend a run without changing its schedule, give "
               f"train.lr_decay_iters when the run starts")
    return config if args.overrides else None


def _print_header(trainer):
    """One line before training: where the run is, on what, how big, how to continue it."""
    if not trainer.display_enabled:
        return
    from ..backend import gpu_name
    t, device = trainer.config.train, trainer.device
    where = str(device)
    if device.is_cuda:
        name = gpu_name(device)
        where += f" ({name})" if name else ""
    ranks = "" if trainer.dist is None else f" x {trainer.dist.world_size} ranks"
    tokens = t.batch_size * t.grad_accum * trainer.config.model.block_size
    print(f"run {trainer.run_dir.path}: {where}{ranks}, {trainer.gpt_config.num_params():,} "
          f"parameters, {tokens:,} tokens/step, {t.precision}, {trainer.total_steps:,} steps; "
          f"continue it later with: xpmodel train --resume {trainer.run_dir.path}", flush=True)
    if device.is_cuda:
        peak, source = trainer.mfu_peak()
        print(f"MFU against {source}" if peak else source, flush=True)


def sample_command(args):
    """Stream samples; control characters a model generates (an escape byte
    from a byte-level model, say) are shown escaped, never sent to the terminal.
    Text is printed as the tokenizer decodes it after the prompt, as soon as
    later tokens cannot change it (a character split across tokens once all
    its bytes have arrived; see IncrementalDecoder); bytes left unfinished
    when the sample ends print as U+FFFD."""
    from ..model.generate import generate
    from ..train.display import printable
    from ..train.runs import load
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None:
        _check_seed(args.seed)
    _check_utf8("--prompt", args.prompt)
    refuse_model_folder(args.run_dir, "RUN_DIR")
    model, tokenizer = load(args.run_dir, device=args.device, checkpoint=args.checkpoint,
                            kernels=args.kernels)
    context = tokenizer.encode(args.prompt, allowed_special="all")
    prompt = context or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    out = sys.stdout
    if out is None:   # started with stdout closed: no reader, as with a closed pipe
        return 0
    if hasattr(out, "reconfigure"):   # a stdout that is not UTF-8 shows other characters as \uXXXX
        out.reconfigure(errors="backslashreplace")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(printable(args.prompt))
        seed = None if args.seed is None else args.seed + i
        decoder = tokenizer.incremental_decoder(context)
        for token in generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=seed, stop_id=tokenizer.eot_id,
                              vocab_limit=tokenizer.vocab_size):
            text = decoder.decode([token])
            if text:
                out.write(printable(text))
                out.flush()
        out.write(printable(decoder.decode([], final=True)) + "\n")
        out.flush()
    return 0


def _check_seed(seed):
    """Refuse a --seed that NumPy's generators and a checkpoint cannot hold."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {quote(seed, 40)}")


def _check_utf8(flag, text):
    """Refuse command-line text that is not valid UTF-8 (Python keeps the bad
    bytes of argv as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{flag}: not valid UTF-8 text (a bad byte at character {exc.start} of "
                         f"{quote(text, 80)})") from None


def _warn_if_data_changed(run, train_tokens, val_tokens):
    """A warning when the run's corpus no longer gives the tokens its newest
    checkpoint was trained on (its data_fingerprint): eval then scores the
    validation split of the text as it is now."""
    from ..train.checkpoint import read_checkpoint_meta
    from ..train.state import tokens_fingerprint
    path, _ = run.latest_checkpoint()
    recorded = None if path is None else read_checkpoint_meta(path).get("data_fingerprint")
    if recorded is not None and recorded != tokens_fingerprint(train_tokens, val_tokens):
        print(f"warning: {run.path}: data.source has changed since the run trained on it; this "
              f"is the validation split of the corpus as it is now", file=sys.stderr, flush=True)


def eval_command(args):
    from ..data import prepare, read_token_file
    from ..data.corpus import load_tokens
    from ..data.sources import resolve_given
    from ..train.evaluate import evaluate_tokens
    from ..train.rundir import RunDir
    from ..train.runs import load
    if args.batches is not None and args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    refuse_model_folder(args.run_dir, "RUN_DIR")
    source = None if args.data is None else resolve_given(args.data, "--data")
    model, tokenizer = load(args.run_dir, device=args.device, checkpoint=args.checkpoint,
                            kernels=args.kernels)
    config = RunDir(args.run_dir).load_config()
    T = model.config.block_size
    if source is None:
        train_tokens, tokens = load_tokens(config.data, tokenizer, T, show_progress=False)
        _warn_if_data_changed(RunDir(args.run_dir), train_tokens, tokens)
        what = "validation split"
    else:
        from ..data.corpus import encoding_workers, run_cache_root
        path = prepare(source, tokenizer, cache_dir=run_cache_root(config.data) / "tokens",
                       workers=encoding_workers(source))
        tokens = read_token_file(path, expected_fingerprint=tokenizer.fingerprint(),
                                 vocab_size=tokenizer.vocab_size)
        what = args.data
    if len(tokens) < 2:
        raise DataError(f"{what}: fewer than 2 tokens to evaluate")
    # No gradients or backward caches here, so batches can be larger than in training.
    batch_size = max(config.train.batch_size, EVAL_TOKENS_PER_BATCH // T)
    result = evaluate_tokens(model, tokenizer, tokens, batch_size, args.batches)
    print(f"{what}: loss {result['loss']:.4f}  perplexity {perplexity_text(result['perplexity'])}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")
    return 0


def plot_command(args):
    from ..tune.plot import plot_run
    refuse_model_folder(args.run_dir, "RUN_DIR")
    for path in plot_run(args.run_dir, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def prepare_command(args):
    from ..data import prepare, read_token_header, sidecar_path, tokenizing_progress
    from ..data.sources import resolve_given
    from ..tokenizer.bpe import BPETokenizer
    existing_file(args.tokenizer, "--tokenizer", "tokenizer file")
    tokenizer = BPETokenizer.load(args.tokenizer)
    workers = _encoding_workers(args.workers)
    if args.preview is not None and args.preview < 1:
        raise UsageError(f"--preview must be at least 1 token, got {args.preview}")
    source = resolve_given(args.source, "SOURCE")
    if args.out is not None:
        inputs = [*source.files, Path(args.tokenizer)]
        check_output(args.out, "--out", inputs, args.overwrite)
        # its sidecar, the first file of the pair the token file completes
        check_output(sidecar_path(args.out), "--out", inputs, args.overwrite,
                     partner=Path(args.out))
    encoded = []   # bytes encoded so far: none when the file was already up to date
    # the bar is for terminals; a pipe or a file gets the result line alone
    with tokenizing_progress() if sys.stdout.isatty() else nullcontext() as bar:
        def progress(done, total):
            encoded.append(done)
            if bar is not None:
                bar(done, total)
        path = prepare(source, tokenizer, out_path=args.out, workers=workers, progress=progress,
                       rebuild=args.overwrite)
    header = read_token_header(path)
    print(f"wrote {header.count:,} tokens to {path}" if encoded else
          f"{path} already holds these {header.count:,} tokens (corpus and tokenizer unchanged)")
    if args.preview is not None:
        from ..data import read_token_file
        tokens = read_token_file(path, expected_fingerprint=tokenizer.fingerprint(),
                                 vocab_size=tokenizer.vocab_size)
        print(token_preview(tokenizer, tokens[:args.preview].tolist(), len(tokens)))
    return 0


def _encoding_workers(requested):
    """--workers as prepare uses it: at least 1; more than the cores this
    process may use is capped to them, with a note on stderr (encoding is
    CPU-bound, so more processes than cores only cost memory)."""
    if requested is None:
        return None
    if requested < 1:
        raise UsageError(f"--workers must be at least 1, got {requested}")
    cores = usable_cores()
    if requested > cores:
        print(f"note: --workers {requested} is more than the {cores} cores here; using {cores}",
              file=sys.stderr, flush=True)
        return cores
    return requested


def token_preview(tokenizer, ids, total):
    """The first tokens of a token file three ways: ids, the text they decode
    to, and that text cut at token borders (|), control characters escaped."""
    from ..train.display import printable
    pieces = [repr(tokenizer.decode_bytes([i]).decode("utf-8", errors="replace"))[1:-1]
              for i in ids]
    text = tokenizer.decode(ids)
    return (f"the first {len(ids):,} of {total:,} tokens:\n"
            f"ids:    {' '.join(map(str, ids))}\n"
            f"tokens: |{'|'.join(pieces)}|\n"
            f"text:\n{printable(text)}")


def tokenizer_train_command(args):
    from ..data import iter_texts
    from ..data.sources import reads_from, resolve_given
    from ..tokenizer.bpe import MAX_VOCAB, BPETokenizer
    from ..tokenizer.learning import vocab_size_note
    if not 256 <= args.vocab_size <= MAX_VOCAB:
        raise UsageError(f"--vocab-size must be from 256 to {MAX_VOCAB:,}, got {args.vocab_size}")
    source = resolve_given(args.source, "SOURCE")
    check_output(args.out, "--out", source.files, args.overwrite)
    if args.export_hf:
        check_output_dir(args.export_hf, "--export-hf", source.files, args.overwrite)
        if reads_from(args.source, args.export_hf):
            raise UsageError(f"--export-hf {args.export_hf}: SOURCE {quote(args.source, 200)} "
                             f"reaches into it, so the export's merges.txt would become corpus "
                             f"text; choose a folder outside the corpus")
        if inside(args.out, args.export_hf):
            raise UsageError(f"--out {args.out}: is inside --export-hf {args.export_hf}, whose "
                             f"files the export writes; keep the two apart")
    texts = (text for _, text in iter_texts(source))
    tokenizer = BPETokenizer.train(texts, args.vocab_size)
    # --out's data is written first and put in place after the export, which a
    # full disk then stops before either output changes; a Ctrl-C waits for both
    with deferred_signals(), atomic_writer(args.out) as out:
        out.write(tokenizer.to_json().encode("utf-8"))
        out.sync()
        if args.export_hf:
            from ..tokenizer.hf_export import export_tokenizer_hf
            export_tokenizer_hf(tokenizer, args.export_hf, overwrite=args.overwrite)
    # data.tokenizer takes a path holding a / or ending in .json as a file
    as_file = args.out if names_tokenizer_file(str(args.out)) else os.path.join(".", args.out)
    note = vocab_size_note(tokenizer, args.vocab_size)
    if note is not None:
        print(f"note: the tokenizer has {note}")
    print(f"wrote a {tokenizer.vocab_size:,}-id tokenizer to {args.out}; train with it: "
          f"xpmodel train "
          f"{shlex.quote(f'data.source={args.source}')} {shlex.quote(f'data.tokenizer={as_file}')}")
    if args.export_hf:
        print(f"wrote Hugging Face tokenizer files to {args.export_hf}")
    return 0


def export_hf_command(args):
    from ..hf.convert import check_export_target, export_hf
    from ..train.rundir import RunDir
    from ..train.runs import load, overlaps_source, special_ids, weight_sources
    refuse_model_folder(args.run_dir, "RUN_DIR")
    RunDir(args.run_dir).require_run("RUN_DIR")   # a missing input is named before OUT_DIR
    if overlaps(args.out_dir, args.run_dir):
        raise UsageError(f"OUT_DIR {args.out_dir}: overlaps the run {args.run_dir}; export to a "
                         f"folder outside it")
    for source in weight_sources(args.run_dir):   # no --overwrite helps there
        if overlaps_source(args.out_dir, source):
            relative = "" if source.is_absolute() else (
                " (recorded as a relative path, from an unknown working directory, so it may be "
                "any folder whose path ends with it)")
            raise UsageError(f"OUT_DIR {args.out_dir}: overlaps {source}, which the run's "
                             f"weights came from{relative}; export to another folder")
    check_export_target(args.out_dir, args.overwrite, "OUT_DIR")
    model, tokenizer = load(args.run_dir, checkpoint=args.checkpoint)
    ids = special_ids(args.run_dir, tokenizer,
                      warn=lambda text: print(f"note: {text}", file=sys.stderr, flush=True))
    architecture = export_hf(model, tokenizer, args.out_dir, overwrite=args.overwrite,
                             special_ids=ids)
    print(f"wrote a transformers {architecture} to {args.out_dir}")
    return 0


def import_hf_command(args):
    from ..train.rundir import RunDir
    from ..train.runs import import_run
    if not Path(args.hf_dir).is_dir():   # the input first, then --out
        what = "not a" if os.path.lexists(args.hf_dir) else "no such"
        raise UsageError(f"HF_DIR {args.hf_dir}: {what} directory")
    if overlaps(args.out, args.hf_dir):
        raise UsageError(f"--out {args.out}: overlaps HF_DIR {args.hf_dir}, which the import "
                         f"reads; choose another --out")
    RunDir(args.out).check_can_create(args.overwrite, resumable=False)
    with RunDir(args.out).lock("--out"):
        path = import_run(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} as the run {path}")
    return 0


# ---- tuning and diagnosis (the work is in xpmodel/tune/) --------------------------------

def doctor_command(args):
    from ..backend import get_device
    from ..tune.common import load_subject
    from ..tune.doctor import checks_to_skip, diagnose
    if args.overfit_steps < 1:
        raise UsageError(f"--overfit-steps must be at least 1, got {args.overfit_steps}")
    get_device(args.device)   # before the config is read or a tokenizer trained
    checks_to_skip(args.skip)
    _check_subject(args.target, "CONFIG_OR_RUN")
    subject = load_subject(args.target, args.overrides)
    progress = (lambda text: print(text, file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    report = diagnose(subject, device=args.device, overfit_steps=args.overfit_steps,
                      skip=set(args.skip), say=progress, show=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def _check_subject(target, flag):
    """What a tuning tool starts from is a run directory, a config file or a
    shipped name: a plain folder is "not a run", not an unknown config."""
    from ..train.rundir import RunDir
    if os.path.isdir(target):
        refuse_model_folder(target, flag)
        RunDir(target).require_run(flag)


def lr_find_command(args):
    from ..backend import get_device
    from ..tune.common import load_subject
    from ..tune.lr_find import check_outputs, check_ramp, lr_range_test, write_results
    from ..tune.plot import check_png_output
    check_ramp(args.start_lr, args.end_lr, args.steps)
    get_device(args.device)   # before the config is read or a tokenizer trained
    if args.out is not None:
        check_png_output(args.out)
    target = args.config or "default"
    _check_subject(target, "--config")
    subject = load_subject(target, args.overrides)
    out = Path(args.out) if args.out else Path(f"lr-find-{subject.name}.png")
    inputs = [*subject.config_files, *subject.corpus.files]
    if subject.config.train.init_from:   # the run or model folder it starts from
        inputs.append(subject.config.train.init_from)
    if names_tokenizer_file(subject.config.data.tokenizer):
        inputs.append(subject.config.data.tokenizer)
    check_outputs(out, inputs, args.overwrite)   # the plot and its numbers
    print(f"lr-find: {subject.name}, {args.steps} steps from {args.start_lr:g} to {args.end_lr:g}",
          flush=True)
    result = lr_range_test(subject, device=args.device, start_lr=args.start_lr,
                           end_lr=args.end_lr, steps=args.steps)
    if result.stopped_early:
        print(f"the loss diverged at lr {result.lrs[-1]:.2e}; the test stopped there")
    print(f"suggested train.lr={result.suggested_lr:.2e}: {result.rule}")
    written = write_results(result, out, f"lr-find: {subject.name}")
    if out not in written:
        print("(pip install 'xpmodel[plot]' for the plot)")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def runs_command(args):
    from ..tune.compare import find_runs, runs_table, summarize
    runs = find_runs(args.dir)
    if not runs:
        print(f"no runs in {args.dir}")
        return 0
    print("\n".join(runs_table([summarize(run) for run in runs])))
    return 0


def compare_command(args):
    from ..tune.compare import differing_keys, find_runs, plot_runs, runs_table, summarize
    from ..tune.plot import check_png_output
    png = check_png_output(args.out)
    runs = []
    for folder in args.run_dirs:
        found = find_runs(folder)
        if not found:   # a folder of runs may hold a config.json of its own
            refuse_model_folder(folder, "RUN")
        runs += [run for run in found if not any(same_file(run.path, seen.path) for seen in runs)]
    if not runs:
        raise UsageError(f"no runs in {' '.join(args.run_dirs)}")
    out = check_output(png, "--out", overwrite=args.overwrite)   # after the runs: inputs first
    summaries = [summarize(run) for run in runs]
    keys = differing_keys(summaries)
    print("\n".join(runs_table(summaries, extra_columns=keys)))
    print(f"wrote {plot_runs(summaries, out)}")
    return 0


def sweep_command(args):
    from ..backend import get_device
    from ..tune.preset import open_sweep, run_preset, sweep_strategy
    device = get_device(args.device)   # named before the sweep folder is made or read
    _check_seed(args.seed)
    parallel, cores = args.parallel, usable_cores()
    if not device.is_cuda and parallel > cores:
        print(f"note: --parallel {parallel} is more than the {cores} cores here; running {cores} "
              f"trials at once", file=sys.stderr, flush=True)
        parallel = cores
    options = dict(max_iters=args.max_iters, parallel=parallel, metric=args.metric,
                   device=args.device, seed=args.seed,
                   **sweep_strategy(args.sampler, args.pruner, args.storage, args.no_prune))
    if args.preset:
        return run_preset(args.out, args.config, args.specs, **options)
    if not args.specs:
        raise UsageError("give at least one SPEC, e.g. train.lr=log:1e-4..1e-2, or --preset "
                         "tuning-order")
    sweep = open_sweep(args.out, args.config, args.specs, trials=args.trials, **options)
    results = sweep.run()
    print("\n".join(sweep.table()))
    if results["best"]:
        print(f"best: {results['best']}; its config is {Path(args.out) / 'best.yaml'} "
              f"(xpmodel train --config {Path(args.out) / 'best.yaml'})")
    print(f"wrote results.csv, results.json and curves.png in {args.out}")
    return 0
