"""What each `xpmodel` subcommand does; cli.py only parses arguments."""
import math
import sys

import numpy

from .errors import DataError, UsageError

_EVAL_TOKENS_PER_BATCH = 4096


def train_command(args):
    from .distributed import init_distributed
    from .trainer import Interrupted
    dist = init_distributed(args.device)
    if dist.world_size == 1:
        return _train(args, args.device, None)
    # Several ranks: any failure on one rank ends the whole job at once.
    with dist.abort_on_error():
        try:
            return _train(args, dist.device_spec, dist)
        except Interrupted as stop:
            dist.abort(f"stopped by {stop}", stop.exit_code)


def _train(args, device, dist):
    from .config import config_to_dict, load_config
    from .trainer import Trainer
    if args.resume:
        if args.config or args.init_from or args.out:
            raise UsageError("--resume RUN_DIR takes its config from the run; drop --config, "
                             "--init-from and --out (KEY=VALUE may change train.* settings)")
        from .rundir import RunDir
        run = RunDir(args.resume)
        run.require_run("--resume")
        config = None
        if args.overrides:
            saved = run.load_config()
            config = load_config(run.config_path, args.overrides)
            for section in ("data", "model"):
                if config_to_dict(config)[section] != config_to_dict(saved)[section]:
                    raise UsageError(f"--resume: only train.* settings can change, not {section}.*")
            for key in ("batch_size", "seed"):
                if getattr(config.train, key) != getattr(saved.train, key):
                    raise UsageError(f"--resume: train.{key} cannot change within a run (the data "
                                     f"sampler's position depends on it); start a new run with "
                                     f"--init-from {args.resume}")
        trainer = Trainer.resume(args.resume, device=device, overrides_config=config,
                                 quiet=args.quiet, dist=dist)
        if config is not None and trainer.is_main:
            from .config import save_config
            save_config(config, run.config_path)
    else:
        if dist is not None and not args.out:
            raise UsageError("under mpirun every rank must name the same run: pass --out RUN_DIR")
        overrides = list(args.overrides)
        if args.init_from:
            overrides.append(f"train.init_from={args.init_from}")
        config = load_config(args.config, overrides)
        trainer = Trainer.start(config, device=device, out=args.out, overwrite=args.overwrite,
                                quiet=args.quiet, dist=dist, config_name=args.config or "default")
    trainer.run()
    return 0


def sample_command(args):
    """Stream samples; control characters a model generates (an escape byte
    from a byte-level model, say) are shown escaped, never sent to the terminal."""
    from .display import printable
    from .generate import generate
    from .runs import load
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
    model, tokenizer = load(args.run_dir, device=args.device, checkpoint=args.checkpoint)
    prompt = tokenizer.encode(args.prompt, allowed_special="all")
    if not prompt:
        prompt = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    out = sys.stdout
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(args.prompt)
        seed = None if args.seed is None else args.seed + i
        pending = []   # ids not yet printable: they end inside a UTF-8 character
        for token in generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=seed, stop_id=tokenizer.eot_id):
            pending.append(token)
            text = tokenizer.decode_bytes(pending)
            try:
                out.write(printable(text.decode("utf-8")))
                pending = []
            except UnicodeDecodeError:
                if len(pending) > 8:
                    out.write(printable(text.decode("utf-8", errors="replace")))
                    pending = []
            out.flush()
        if pending:
            out.write(printable(tokenizer.decode(pending)))
        out.write("\n")
        out.flush()
    return 0


def eval_command(args):
    from .corpus import load_tokens
    from .data import prepare, read_token_file
    from .rundir import RunDir
    from .runs import load
    model, tokenizer = load(args.run_dir, device=args.device, checkpoint=args.checkpoint)
    config = RunDir(args.run_dir).load_config()
    T = model.config.block_size
    if args.data is None:
        _, tokens = load_tokens(config.data, tokenizer, T, show_progress=False)
        what = "validation split"
    else:
        from .corpus import cache_root, encoding_workers
        path = prepare(args.data, tokenizer, cache_dir=cache_root(config.data) / "tokens",
                       workers=encoding_workers(args.data))
        tokens = read_token_file(path, expected_fingerprint=tokenizer.fingerprint())
        what = args.data
    if len(tokens) < 2:
        raise DataError(f"{what}: fewer than 2 tokens to evaluate")
    # No gradients or backward caches here, so batches can be larger than in training.
    batch_size = max(config.train.batch_size, _EVAL_TOKENS_PER_BATCH // T)
    result = evaluate_tokens(model, tokenizer, tokens, batch_size, args.batches)
    print(f"{what}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")
    return 0


def evaluate_tokens(model, tokenizer, tokens, batch_size, max_batches=None):
    """Loss over consecutive windows, each target predicted once, and bits per byte."""
    T = model.config.block_size
    specials = set(tokenizer.special_tokens.values())   # e.g. <|endoftext|>: no bytes of text
    byte_lengths = numpy.array([len(tokenizer.token_bytes(i))
                                if i < tokenizer.vocab_size and i not in specials else 0
                                for i in range(model.config.vocab_size)])
    starts = list(range(0, len(tokens) - 1, T))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    if max_batches is not None:
        if max_batches < 1:
            raise UsageError(f"--batches must be at least 1, got {max_batches}")
        batches = batches[:max_batches]
    for batch in batches:
        x = numpy.full((len(batch), T), 0, dtype=numpy.int64)
        y = numpy.full((len(batch), T), -1, dtype=numpy.int64)
        for row, start in enumerate(batch):
            window = numpy.asarray(tokens[start:start + T + 1], dtype=numpy.int64)
            x[row, :len(window) - 1] = window[:-1]
            y[row, :len(window) - 1] = window[1:]
        count = int((y >= 0).sum())
        total_nats += float(model.loss(x, y)) * count
        total_tokens += count
        total_bytes += int(byte_lengths[y[y >= 0]].sum())
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": total_tokens,
            "bits_per_byte": total_nats / math.log(2) / max(total_bytes, 1)}


def plot_command(args):
    from .plot import plot_run
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def prepare_command(args):
    from .data import prepare, read_token_header, tokenizing_progress
    from .tokenizer import BPETokenizer
    tokenizer = BPETokenizer.load(args.tokenizer)
    with tokenizing_progress() as progress:
        path = prepare(args.source, tokenizer, out_path=args.out, workers=args.workers,
                       progress=progress)
    header = read_token_header(path)
    print(f"wrote {header.count:,} tokens to {path}")
    return 0


def tokenizer_train_command(args):
    from .data import iter_texts
    from .tokenizer import BPETokenizer
    texts = (text for _, text in iter_texts(args.source))
    tokenizer = BPETokenizer.train(texts, args.vocab_size)
    tokenizer.save(args.out)
    print(f"wrote a {tokenizer.vocab_size}-id tokenizer to {args.out}")
    if args.export_hf:
        tokenizer.export_hf(args.export_hf)
        print(f"wrote Hugging Face tokenizer files to {args.export_hf}")
    return 0


def export_hf_command(args):
    from .hf import export_hf
    from .runs import load
    model, tokenizer = load(args.run_dir, checkpoint=args.checkpoint)
    export_hf(model, tokenizer, args.out_dir)
    print(f"wrote a transformers GPT2LMHeadModel to {args.out_dir}")
    return 0


def import_hf_command(args):
    from .runs import import_run
    path = import_run(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} as the run {path}")
    return 0

