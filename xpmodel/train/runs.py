"""Loading trained runs (`xpmodel.load(RUN_DIR)`), weights for `--init-from`,
`import-hf`'s runs, and what export-hf needs to know of where a run's
weights came from."""
import os
import sys
from dataclasses import replace
from pathlib import Path

from ..config import ModelConfig, load_config
from ..errors import CheckpointError, UsageError, XpmodelError, setting_text
from ..files import inside, same_file
from ..hf.convert import (SPECIAL_ID_KEYS, check_special_ids, hf_special_ids, import_hf,
                          import_hf_with_special_ids)
from ..model.config import OPTION_KEYS, gpt_config
from ..model.gpt import GPT
from ..model.params import parameter_shapes
from .checkpoint import read_checkpoint_meta, save_checkpoint, step_of_name
from .rundir import RunDir

# The ModelConfig keys --init-from takes from its source (block_size with a caveat)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", *OPTION_KEYS)
# load's choices of checkpoint
CHECKPOINTS = ("latest", "best")
# How often load lists checkpoints/ again when a checkpoint it was about to
# read was pruned meanwhile (a trainer saving at every step prunes as often)
_RELISTS = 10


def load(run_dir, device="cpu", checkpoint="latest", kernels="fused", warn=None):
    """(model, tokenizer) of a run, from its latest (or best) checkpoint, in eval
    mode; kernels as GPT's ("fused" or "xp" on CUDA).

    The model's shape comes from the run's config.yaml; a checkpoint whose
    tensors do not have exactly those shapes is refused before any tensor is
    read. A damaged latest checkpoint is passed over for an older one, and
    `warn` (by default a line on stderr) is told of each file passed over;
    one pruned by a trainer as it was about to be read is not passed over:
    checkpoints/ is listed again. Each header is read once, and only until a
    checkpoint is usable. A run whose files are missing while another
    process holds its lock (creating it, or replacing it with --overwrite)
    is refused, naming that process.
    """
    if checkpoint not in CHECKPOINTS:
        raise UsageError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
    run = RunDir(run_dir)
    run.require_run("RUN_DIR")
    try:
        config = run.load_config()
        tokenizer = run.load_tokenizer()
    except XpmodelError:
        if not (run.config_path.is_file() and run.tokenizer_path.is_file()):
            run.refuse_if_being_written("RUN_DIR")   # removed by --overwrite, say
        raise
    path, weights, problems = _usable_checkpoint(run, checkpoint, config, tokenizer)
    if weights is None:     # none while a trainer holds the lock: --overwrite is replacing them
        run.refuse_if_being_written("RUN_DIR")
        if problems:
            raise CheckpointError(f"{run.path}: no usable checkpoint; the newest: {problems[0]}")
        raise CheckpointError(f"{run.path}: the run has no checkpoint")
    gpt_config, arrays = weights
    untrained = " (the untrained weights)" if step_of_name(path.name) == 0 else ""
    for problem in problems:
        warn(f"skipping checkpoint: {problem}; using {path.name}{untrained}")
    model = GPT(gpt_config, device=device, kernels=kernels)
    model.load_state_arrays(arrays)
    return model.eval(), tokenizer


def _usable_checkpoint(run, which, config, tokenizer):
    """(path, _read_weights' result, problems) of the first usable checkpoint
    of `_candidates` ((None, None, problems) when none is), and why each
    one tried before it could not be used. A step checkpoint gone when it is
    read was pruned by a trainer that saved a newer one since checkpoints/
    was listed: it is listed again (up to _RELISTS times), and the one gone
    is no problem to warn of."""
    for relists_left in reversed(range(_RELISTS + 1)):
        problems = []
        for path, header, problem in _candidates(run, which):
            weights, problem = _weights_or_problem(header, problem, config, tokenizer, run)
            if weights is None and header is not None and not header.unchanged():
                # a trainer saved a new file there since its header was read: read that one
                weights, problem = _weights_or_problem(*run.read_checkpoint(path), config,
                                                       tokenizer, run)
            if weights is not None:
                return path, weights, problems
            if relists_left and path != run.best_path and not os.path.lexists(path):
                break
            problems.append(problem)
        else:
            return None, None, problems


def _candidates(run, which):
    """(path, header, problem) of the checkpoints to try, in order of
    preference, as RunDir.read_checkpoint gives them, each read only when the
    ones before it could not be used."""
    if which == "best":
        yield _best_candidate(run)
    yield from run.checkpoints_newest_first()
    if which == "latest" and os.path.lexists(run.best_path):
        yield _best_candidate(run)


def _best_candidate(run):
    if not os.path.lexists(run.best_path):
        return run.best_path, None, (f"{run.best_path}: no such file (a run writes it at its "
                                     f"first evaluation)")
    return (run.best_path, *run.read_checkpoint(run.best_path))


def _weights_or_problem(header, problem, config, tokenizer, run):
    """(_read_weights' result, None) of a checkpoint's header, or (None, why
    the checkpoint cannot be used): `problem` when there is no header."""
    if header is None:
        return None, problem
    try:
        return _read_weights(header, config, tokenizer, run), None
    except CheckpointError as exc:
        return None, str(exc)


def _read_weights(header, config, tokenizer, run):
    """(GPTConfig, name -> array) of one checkpoint (its CheckpointHeader),
    checked against the run's config before its tensors are read."""
    path, meta = header.path, header.meta
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise CheckpointError(f"{path}: saved with a different tokenizer than {run.tokenizer_path}")
    vocab = meta.get("vocab_size") or tokenizer.vocab_size
    if type(vocab) is not int or vocab < tokenizer.vocab_size:
        raise CheckpointError(f"{path}: vocab_size {vocab!r} does not fit the run's tokenizer "
                              f"of {tokenizer.vocab_size} ids")
    shape = gpt_config(replace(config.model, vocab_size=vocab), tokenizer.vocab_size)
    _check_parameter_count(header, shape, run)
    _, params, _ = header.load(dict(parameter_shapes(shape)), None)
    return shape, params


def _check_parameter_count(header, shape, run):
    """Refuse a checkpoint that does not hold as many weights as the run's
    config.yaml describes, counting both without listing them: the list of
    parameter shapes (and the model) is made only for a config that the
    checkpoint's header, bounded by the file's size, matches. A config.yaml
    edited to model.n_layer: 1000000000 is refused at once, not after
    gigabytes of names."""
    held, needed = header.param_count(), shape.num_params()
    if held != needed:
        raise CheckpointError(f"{header.path}: holds {held:,} weights, but {run.config_path} "
                              f"describes a model of {needed:,} (model.n_layer={shape.n_layer}, "
                              f"n_embd={shape.n_embd}, n_head={shape.n_head}); the config does not "
                              f"match the checkpoint")


def load_pretrained(source):
    """(GPTConfig, name -> array, tokenizer) of an xpmodel run or a Hugging Face
    GPT-2 or Llama directory, for `train.init_from`."""
    source_path = Path(source)
    if RunDir(source_path).is_run():
        model, tokenizer = load(source_path)
        return model.config, model.state_arrays(), tokenizer
    if (source_path / "config.json").is_file():
        return import_hf(source_path)
    raise UsageError(f"train.init_from {source}: neither an xpmodel run nor a Hugging Face "
                     f"model directory (no run.json or config.json)")


def weight_sources(run_dir):
    """The folders a run's weights came from, as far as its files say: its
    train.init_from (a run or a Hugging Face directory), that run's own, and
    so on; an imported run's step-0 checkpoint names the directory it was
    imported from. xpmodel records both as absolute paths; a run made by an
    older xpmodel may hold a relative one (see `overlaps_source`)."""
    return [folder for folder, _ in _weight_chain(run_dir)][1:]


def _weight_chain(run_dir):
    """(folder, import metadata) of the run at `run_dir`, then of each folder
    of its weight_sources in turn; the metadata is _import_meta's for a run,
    None for a folder that is not one. Each run's step-0 checkpoint is read once."""
    folder, sources = Path(run_dir), []
    while True:
        run = RunDir(folder)
        meta = _import_meta(run) if run.is_run() else None
        yield folder, meta
        if meta is None:
            return
        imported_from = meta.get("source") if isinstance(meta.get("source"), str) else None
        source = run.load_config().train.init_from or imported_from
        if source is None or any(same_file(source, seen) for seen in sources):
            return
        sources.append(Path(source))
        folder = Path(source)


def _import_meta(run):
    """The step-0 checkpoint's metadata of a run `import-hf` made; {} for another run."""
    try:
        meta = read_checkpoint_meta(run.step_path(0))
    except (CheckpointError, OSError):
        return {}
    return meta if meta.get("kind") == "imported" else {}


def special_ids(run_dir, tokenizer, warn):
    """{"bos_token_id", "eos_token_id"} for an export of a run whose tokenizer
    is `tokenizer`: those of the Hugging Face directory its weights came from,
    as import-hf recorded them in the step-0 checkpoint of the run (or of a run
    it was initialised from), else as that directory's config.json says now;
    None when the weights came from no such directory. A directory that cannot
    be read, or whose tokenizer is no longer the run's, gives None too, and
    `warn` says so."""
    for folder, meta in _weight_chain(run_dir):
        if meta is not None:
            if all(key in meta for key in SPECIAL_ID_KEYS) \
                    and meta.get("tokenizer_fingerprint") == tokenizer.fingerprint():
                return check_special_ids(meta, tokenizer.vocab_size, CheckpointError,
                                         RunDir(folder).step_path(0))
        elif (folder / "config.json").is_file():
            return _directory_special_ids(folder, tokenizer, warn)
    return None


def _directory_special_ids(hf_dir, tokenizer, warn):
    """hf_special_ids of a directory a run's weights came from, if its tokenizer is the run's."""
    fallback = "the export names the default bos and eos (<|endoftext|>, if the tokenizer has it)"
    try:
        ids, its_tokenizer = hf_special_ids(hf_dir)
    except XpmodelError as exc:
        warn(f"{exc}; {fallback}")
        return None
    if its_tokenizer != tokenizer:
        warn(f"{hf_dir}, where the run's weights came from, no longer holds the run's tokenizer; "
             f"{fallback}")
        return None
    return ids


def overlaps_source(folder, source):
    """Whether `folder` is, lies in or holds `source`, a folder of weight_sources.

    Sources are recorded absolute; a relative one in a run's files is relative
    to a working directory that no file names, so it may be any folder whose
    path ends with it: `folder` overlaps it when `folder` or a folder above it
    ends so, wherever it is."""
    source = Path(source)
    if inside(folder, source) or inside(source, folder):
        return True
    if source.is_absolute():
        return False
    # normpath leaves ".." only in front: the part that says where it started
    tail = tuple(part for part in Path(os.path.normpath(source)).parts if part not in ("..", "."))
    for path in {Path(folder).resolve(), Path(os.path.abspath(folder))}:
        if any(_ends_with(above, tail) for above in (path, *path.parents)):
            return True
    return False


def _ends_with(path, tail):
    """Whether the last parts of `path` are `tail` (a tuple of names)."""
    return len(path.parts) >= len(tail) and path.parts[len(path.parts) - len(tail):] == tail


def adopt_pretrained(config, gpt_config, tokenizer):
    """`config` with the model shape and tokenizer settings of pretrained weights.

    block_size is the source's too, unless its positions are rotary (no
    parameter then depends on it) and the config sets its own: a shorter
    context, or a longer one than the source was trained on."""
    data = replace(config.data, tokenizer="bpe" if tokenizer.merges else "byte",
                   vocab_size=max(256, tokenizer.vocab_size))
    padded = gpt_config.vocab_size if gpt_config.vocab_size != tokenizer.vocab_size else None
    options = {key: getattr(gpt_config, key) for key in OPTION_KEYS}
    own_context = gpt_config.position == "rope" and "block_size" in settings_chosen(config.model)
    block_size = config.model.block_size if own_context else gpt_config.block_size
    model = replace(config.model, n_layer=gpt_config.n_layer, n_head=gpt_config.n_head,
                    n_embd=gpt_config.n_embd, block_size=block_size, vocab_size=padded,
                    **options)
    return replace(config, data=data, model=model)


def settings_chosen(model):
    """The shape keys of a ModelConfig whose values differ from ModelConfig's
    defaults: those a config file or an override chose. (The config does not
    record which keys were named, so one set to its default value counts as
    not chosen.)"""
    defaults = ModelConfig()
    return [key for key in SHAPE_KEYS if getattr(model, key) != getattr(defaults, key)]


def ignored_settings(model, adopted):
    """`model.KEY=value` of each setting `model` chose that `adopted` (its
    config after adopt_pretrained) does not have."""
    return [f"model.{key}={setting_text(getattr(model, key))}" for key in settings_chosen(model)
            if getattr(model, key) != getattr(adopted, key)]


def import_run(hf_dir, out, overwrite=False):
    """Make a run from a Hugging Face GPT-2 or Llama directory: its config, tokenizer and
    a step-0 checkpoint holding the weights, ready for sample, eval and
    training with `--resume` or `--init-from`."""
    gpt_config, arrays, tokenizer, ids = import_hf_with_special_ids(hf_dir)
    config = adopt_pretrained(load_config(), gpt_config, tokenizer)
    config = replace(config, model=replace(config.model, dropout=gpt_config.dropout))
    run = RunDir(out)
    meta = {"kind": "imported", "source": str(Path(hf_dir).resolve()), "step": 0,
            "vocab_size": gpt_config.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint(),
            **ids}
    run.create(config, tokenizer, overwrite=overwrite,
               first_checkpoint=lambda path: save_checkpoint(path, arrays, {}, meta))
    return run.path
