"""Starting and resuming a run: everything that can fail on bad input is
checked before the run directory is written; --init-from takes the model's
shape from its source (runs.adopt_pretrained); the one config-to-model path
(build_model, which the tuning tools use too); the sampler and the run's
length in steps."""
import os
from dataclasses import replace
from pathlib import Path

from ..backend import import_cupy, get_device, out_of_memory_errors
from ..config.sections import names_tokenizer_file
from ..data import BUILTIN_NAMES, EpochSampler, RandomWindowSampler
from ..data.corpus import build_tokenizer
from ..data.sources import reads_from
from ..errors import CheckpointError, UsageError, XpmodelError, quote
from ..files import overlaps
from ..model.config import gpt_config
from ..model.gpt import GPT
from ..model.params import part_sizes
from .muon import Muon
from .optim import AdamW
from .rundir import RunDir, default_run_path
from .runs import adopt_pretrained, ignored_settings, load_pretrained


def gpt_config_for(config, tokenizer):
    """The GPTConfig of a run config's model.* with the tokenizer's ids
    (model.vocab_size may pad past them, never fall short)."""
    vocab = config.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids")
    return gpt_config(config.model, tokenizer.vocab_size)


def build_model(config, tokenizer, device, dropout=None, embedding_noise=None, ranks=1):
    """The model a run config (`config`) trains, at the seed's initial weights:
    its GPTConfig checked against this machine's memory before anything is
    allocated, then train.seed, precision, kernels, recompute and
    embedding_noise. Training and the tuning tools (lr-find, doctor) build
    their models here; `dropout` and `embedding_noise` (an alpha) override the
    config's; `ranks` processes share each batch (data parallelism)."""
    t = config.train
    shape = gpt_config_for(config, tokenizer)
    if dropout is not None:
        shape = replace(shape, dropout=dropout)
    device = get_device(device)
    check_fits_in_memory(shape, device)
    check_activations_fit(shape, t.batch_size // ranks, device)
    try:
        model = GPT(shape, device=device, seed=t.seed, precision=t.precision, kernels=t.kernels,
                    recompute=t.recompute)
    except out_of_memory_errors() as exc:
        raise out_of_memory_creating(shape, device, exc) from None
    alpha = t.embedding_noise if embedding_noise is None else embedding_noise
    model.embedding_noise = (alpha, t.embedding_noise_kind)
    return model


def out_of_memory_creating(gpt_config, device, exc):
    """The error for an allocation that failed while making a model or its optimizer."""
    return XpmodelError(f"out of {'GPU ' if device.is_cuda else ''}memory creating a model of "
                        f"{gpt_config.num_params():,} parameters ({exc.__class__.__name__}): "
                        f"lower model.n_layer, model.n_embd or model.vocab_size")


def check_fits_in_memory(gpt_config, device):
    """Refuse, before allocating, a model whose training state cannot fit: on
    the host, the float64 buffer the weights are drawn in, and on CPU the
    weights, gradients, two AdamW moments and a scratch buffer in float32; on
    a GPU, those four in float32 and a 16-bit working copy. The count comes
    from the config, so any size is measured at once."""
    n = gpt_config.num_params()
    needs = [("this machine", n * (8 + 4 if device.is_cuda else 8 + 5 * 4), _host_memory())]
    if device.is_cuda:
        needs.append(("the GPU", n * (4 * 4 + 2), _gpu_memory(device)))
    for where, needed, available in needs:
        if available is not None and needed > available:
            raise UsageError(f"a model of {n:,} parameters needs about {needed / 2**30:,.1f} GiB "
                             f"to train, more than {where}'s {available / 2**30:,.1f} GiB; lower "
                             f"{' or '.join(_largest_parts(gpt_config))}")


def check_activations_fit(gpt_config, rows, device):
    """Refuse, naming train.batch_size, a micro-batch whose `rows` windows (this
    process's share) cannot keep their activations where the model computes
    (the host, or the GPU), by a lower bound: what every train.recompute mode
    keeps for backward, each block's input in float32, and the residual
    stream, C channels a token each. An absurd batch is refused at once
    instead of after minutes of allocating."""
    c = gpt_config
    needed = rows * c.block_size * c.n_embd * (c.n_layer + 1) * 4
    where, available = (("the GPU", _gpu_memory(device)) if device.is_cuda
                        else ("this machine", _host_memory()))
    if available is not None and needed > available:
        raise UsageError(f"train.batch_size: a micro-batch of {rows:,} "
                         f"windows of {c.block_size:,} tokens keeps at least "
                         f"{needed / 2**30:,.1f} GiB of activations, more than {where}'s "
                         f"{available / 2**30:,.1f} GiB; lower train.batch_size (train.grad_accum "
                         f"keeps the tokens a step)")


def check_batches_fit(config):
    """Refuse, naming the key, before anything is allocated or written, a batch
    whose token arrays (inputs and targets, int64, (B, T) each) or an evaluation
    whose window starts (train.eval_batches * B of them, float64 as drawn and
    int64 as used, numpy.linspace) cannot fit in this machine's memory."""
    t, T = config.train, config.model.block_size
    available = _host_memory()
    if available is None:
        return
    needs = [("train.batch_size", t.batch_size, t.batch_size * T * 8 * 2,
              f"a batch of {t.batch_size:,} windows of {T:,} tokens needs", "or model.block_size"),
             ("train.eval_batches", t.eval_batches, t.eval_batches * t.batch_size * 8 * 3,
              f"an evaluation's {t.eval_batches * t.batch_size:,} window starts "
              f"(train.eval_batches x train.batch_size) need", "or train.batch_size")]
    for key, value, needed, what, other in needs:
        if needed > available:
            raise UsageError(f"{key}={value}: {what} about {needed / 2**30:,.1f} GiB, more "
                             f"than this machine's {available / 2**30:,.1f} GiB; lower {key} {other}")


def _largest_parts(gpt_config):
    """The model.* keys that size the parts holding at least a tenth of the
    parameters, the largest part first, then model.n_embd, which scales them
    all. The MLPs count under model.mlp_hidden when it is set, else under
    model.n_layer. (The estimate counts weights, not activations: the batch
    size plays no part in it.)"""
    sizes = part_sizes(gpt_config)
    n = sum(sizes.values())
    parts = [(sizes["mlps"], "model.n_layer" if gpt_config.mlp_hidden is None else "model.mlp_hidden"),
             (sizes["other"], "model.n_layer"),
             (sizes["wte"] + sizes["lm_head"], "model.vocab_size"),
             (sizes["positions"], "model.block_size")]
    large = [key for size, key in sorted(parts, reverse=True) if size >= n / 10]
    return list(dict.fromkeys(large + ["model.n_embd"]))


def _host_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_memory(device):
    """The GPU's total memory in bytes, or None where CuPy cannot tell."""
    try:
        with import_cupy().cuda.Device(device.index):
            return int(import_cupy().cuda.runtime.memGetInfo()[1])
    except Exception:   # an emulated or unusual CuPy: leave it to the allocation
        return None


def optimizer_for(model, t):
    """The optimizer a TrainConfig (`t`) asks for: AdamW, or Muon with AdamW (muon.py)."""
    if t.optimizer == "muon":
        return Muon(model, lr=t.lr, muon_lr=t.muon_lr, betas=(t.beta1, t.beta2), eps=t.eps,
                    weight_decay=t.weight_decay, momentum=t.muon_momentum, nesterov=t.muon_nesterov,
                    ns_coefficients=t.muon_ns_coefficients, ns_steps=t.muon_ns_steps,
                    muon_weight_decay=t.muon_weight_decay, adjust_lr=t.muon_adjust_lr)
    return AdamW(model, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)


def absolute_source(source):
    """data.source as the run keeps it: a path (or glob) made absolute, so the
    run resumes and evaluates from any folder; a built-in corpus name as it is."""
    return source if source in BUILTIN_NAMES else os.path.abspath(os.path.expanduser(source))


def absolute_init_from(init_from):
    """train.init_from as the run keeps it: the folder resolved to an absolute
    path (links followed), so export-hf knows it from any working directory."""
    return str(Path(init_from).resolve()) if init_from else init_from


def absolute_tokenizer(tokenizer):
    """data.tokenizer as the run keeps it: a tokenizer file's path made absolute,
    so the run's config.yaml can be used from any folder; a kind as it is."""
    return os.path.abspath(tokenizer) if names_tokenizer_file(tokenizer) else tokenizer


def check_out_outside_corpus(source, out):
    """Refuse a run directory that data.source reaches into (see
    sources.reads_from): its checkpoints would be read back as corpus text,
    and a resume would find another corpus than the run started with."""
    if reads_from(source, out):
        raise UsageError(f"--out {out}: data.source {quote(source, 200)} reaches into it (or "
                         f"lies inside it), so the run's own files would become its training "
                         f"text; choose an --out outside the corpus")


def check_out_outside_init_from(init_from, out):
    """Refuse a run directory that is, holds or lies inside the folder
    train.init_from reads (links resolved): the run would write into its source."""
    if init_from and overlaps(init_from, out):
        raise UsageError(f"--out {out}: overlaps {init_from}, the folder --init-from reads; "
                         f"choose another --out")


def make_sampler(config, tokenizer, train_tokens):
    """The training sampler a run config asks for: random windows or epochs,
    with crops and token dropout."""
    d, t, T = config.data, config.train, config.model.block_size
    mask_id = tokenizer.mask_id
    if d.token_dropout_mode == "mask" and mask_id is None:
        raise UsageError("data.token_dropout_mode=mask needs a tokenizer that reserves "
                         "<|mask|>; this run's tokenizer (from --init-from or an earlier "
                         "run) has none: use data.token_dropout_mode=random, or start from "
                         "fresh weights so the tokenizer is built with it")
    common = dict(token_dropout=d.token_dropout, vocab_size=tokenizer.vocab_size,
                  token_dropout_mode=d.token_dropout_mode, mask_id=mask_id)
    if d.batching == "epochs":
        return EpochSampler(train_tokens, t.batch_size, T, t.seed, random_crop=d.crop_augment,
                            source=d.source, **common)
    return RandomWindowSampler(train_tokens, t.batch_size, T, t.seed, **common)


def count_steps(t, sampler):
    """The run's length in optimizer steps: train.max_iters (`t` is the TrainConfig), else
    train.epochs of the sampler, which must hold train.warmup_iters (a max_iters run's
    warmup is checked with the config)."""
    if t.max_iters is not None:
        return t.max_iters
    steps = t.epochs * sampler.batches_per_epoch // t.grad_accum
    if steps == 0:
        raise UsageError(f"train.epochs={t.epochs}: one epoch has only "
                         f"{sampler.batches_per_epoch} batches, fewer than "
                         f"train.grad_accum={t.grad_accum}")
    if t.warmup_iters > steps:
        raise UsageError(f"train.warmup_iters ({t.warmup_iters}) is longer than the run "
                         f"(train.epochs = {t.epochs}: {steps} steps); set train.warmup_iters "
                         f"to at most {steps}")
    return steps


class RunSetup:
    """How a Trainer comes to be: `start` (a new run) or `resume`."""

    @classmethod
    def start(cls, config, device="cpu", out=None, overwrite=False, quiet=False, dist=None,
              config_name="default", show=True):
        """A new run in `out`. Everything that can fail on bad input (device,
        data, model size) is checked before the run directory is written;
        the directory gets run.json only after its step-0 checkpoint."""
        is_main = dist is None or dist.is_main
        check_batches_fit(config)
        config = replace(config, data=replace(
            config.data, source=absolute_source(config.data.source),
            tokenizer=absolute_tokenizer(config.data.tokenizer)))
        device = get_device(device)
        if dist is not None:
            dist.shard(config.train.batch_size)   # refuses a batch the ranks cannot split
        run = RunDir(out or default_run_path(config_name))
        check_out_outside_corpus(config.data.source, run.path)
        check_out_outside_init_from(config.train.init_from, run.path)
        if is_main:
            run.check_can_create(overwrite)
        pretrained = None
        if config.train.init_from:
            pretrained = load_pretrained(config.train.init_from)
            source_config, _, tokenizer = pretrained
            adopted = adopt_pretrained(config, source_config, tokenizer)
            ignored = ignored_settings(config.model, adopted.model)
            if names_tokenizer_file(config.data.tokenizer):
                ignored.append(f"data.tokenizer={config.data.tokenizer}")
            if ignored and show and is_main:
                learned = " (block_size too: its positions are learned)" \
                    if adopted.model.position == "learned" else ""
                print(f"--init-from {config.train.init_from}: the model shape and tokenizer come "
                      f"from the source{learned}; ignoring {', '.join(ignored)}")
            config = adopted
        else:
            tokenizer = build_tokenizer(config.data, say=print if (show and is_main) else (lambda s: None))
        trainer = cls(config, run, tokenizer, device, quiet=quiet, dist=dist, show=show)
        if pretrained is not None:
            trainer.model.load_state_arrays(pretrained[1])
        if is_main:
            run.create(config, tokenizer, overwrite=overwrite, first_checkpoint=trainer.save_first)
        if dist is not None:
            dist.barrier()
        if pretrained is not None:
            trainer._say(f"initialised weights from {config.train.init_from}")
        return trainer

    @classmethod
    def resume(cls, path, device="cpu", overrides_config=None, quiet=False, dist=None, show=True,
               checkpoints=None):
        """The run at `path`, continued from its newest usable checkpoint;
        checkpoints: the run's checkpoints_newest_first() as a list, when the
        caller has read them already (for its own checks)."""
        run = RunDir(path)
        run.require_run("--resume")
        config = overrides_config or run.load_config()
        check_batches_fit(config)
        tokenizer = run.load_tokenizer()
        trainer = cls(config, run, tokenizer, device, quiet=quiet, dist=dist, show=show)
        if checkpoints is None:
            checkpoints = list(run.checkpoints_newest_first())
        trainer.checkpoints_read = checkpoints
        checkpoint = None
        problems = []
        for candidate, header, problem in checkpoints:
            if problem is None:
                problem = run.checkpoint_config_problem(header, config)
            if problem is None:
                try:
                    trainer._load(header)
                    checkpoint = candidate
                    break
                except CheckpointError as exc:
                    problem = str(exc)
            problems.append(problem)
        if checkpoint is None:
            if problems:
                raise CheckpointError(f"--resume {path}: no usable checkpoint; the newest: "
                                      f"{problems[0]}")
            raise CheckpointError(f"--resume {path}: the run has no checkpoint to resume from; "
                                  f"start it again with --out {path} --overwrite")
        for problem in problems:
            trainer._say(f"skipping checkpoint: {problem}; using {checkpoint.name}")
        if trainer.is_main:
            run.remove_stale_temporaries()
            run.truncate_metrics(trainer.step)
        trainer._say(f"resumed {path} at step {trainer.step} from {checkpoint.name}")
        return trainer
