"""Loading trained runs: `xpmodel.load(RUN_DIR)` and weights for `--init-from`."""
from pathlib import Path

from .checkpoint import load_checkpoint, read_checkpoint_header, read_checkpoint_meta
from .errors import CheckpointError, UsageError
from .model import GPT, GPTConfig
from .rundir import RunDir


def load(run_dir, device="cpu", checkpoint="latest"):
    """(model, tokenizer) of a run, from its latest (or best) checkpoint, in eval mode."""
    run = RunDir(run_dir)
    run.require_run("RUN_DIR")
    config = run.load_config()
    tokenizer = run.load_tokenizer()
    path = _checkpoint_path(run, checkpoint)
    arrays, meta = _read_weights(path)
    m = config.model
    gpt_config = GPTConfig(vocab_size=int(meta.get("vocab_size") or tokenizer.vocab_size),
                           block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                           n_embd=m.n_embd, dropout=m.dropout)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise CheckpointError(f"{path}: saved with a different tokenizer than {run.tokenizer_path}")
    model = GPT(gpt_config, device=device)
    try:
        model.load_state_arrays(arrays)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model.eval(), tokenizer


def _checkpoint_path(run, which):
    if which == "best" and run.best_path.exists():
        return run.best_path
    path, _ = run.latest_checkpoint()
    if path is None:
        if run.best_path.exists():
            return run.best_path
        raise CheckpointError(f"{run.path}: the run has no readable checkpoint")
    return path


def _read_weights(path):
    """name -> array of a checkpoint, checked against its own header."""
    meta = read_checkpoint_meta(path)
    header = read_checkpoint_header(path)
    shapes = {k[len("param/"):]: v["shape"] for k, v in header.items() if k.startswith("param/")}
    sizes = {k[len("optim/"):]: v["shape"][0] for k, v in header.items() if k.startswith("optim/")}
    _, params, _ = load_checkpoint(path, shapes, sizes)
    return params, meta


def load_pretrained(source):
    """(GPTConfig, name -> array, tokenizer) of an xpmodel run or a Hugging Face
    GPT-2 directory, for `train.init_from`."""
    source_path = Path(source)
    if RunDir(source_path).is_run():
        model, tokenizer = load(source_path)
        return model.config, model.state_arrays(), tokenizer
    if (source_path / "config.json").is_file():
        from .hf import import_hf
        return import_hf(source_path)
    raise UsageError(f"train.init_from {source}: neither an xpmodel run nor a Hugging Face "
                     f"model directory (no run.json or config.json)")


def import_run(hf_dir, out, overwrite=False):
    """Make a run from a Hugging Face GPT-2 directory: its config, tokenizer and
    a step-0 checkpoint holding the weights, ready for sample, eval and
    training with `--resume` or `--init-from`."""
    from .config import RunConfig, load_config
    from .hf import import_hf
    from .checkpoint import save_checkpoint
    from dataclasses import replace
    gpt_config, arrays, tokenizer = import_hf(hf_dir)
    base = load_config()
    config = RunConfig(
        data=replace(base.data, tokenizer="bpe", vocab_size=max(256, tokenizer.vocab_size)),
        model=replace(base.model, n_layer=gpt_config.n_layer, n_head=gpt_config.n_head,
                      n_embd=gpt_config.n_embd, block_size=gpt_config.block_size,
                      dropout=gpt_config.dropout,
                      vocab_size=gpt_config.vocab_size if gpt_config.vocab_size != tokenizer.vocab_size else None),
        train=base.train)
    run = RunDir(out)
    run.create(config, tokenizer, overwrite=overwrite)
    meta = {"kind": "imported", "source": str(hf_dir), "step": 0,
            "vocab_size": gpt_config.vocab_size, "tokenizer_fingerprint": tokenizer.fingerprint()}
    save_checkpoint(run.step_path(0), arrays, {}, meta)
    return run.path
