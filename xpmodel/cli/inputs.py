"""What a command checks of the paths it reads before it does any work: each
mistake is a UsageError (exit 2) naming the argument and the way forward.

A path that names nothing (no such file, a glob that finds no text) is a
mistake in what was asked, exit 2; a file that is there but cannot be used
(empty, binary, not UTF-8, a FIFO, a damaged tokenizer) is bad data, found
by its reader: a DataError, exit 1. A corpus is checked so by
data.sources.resolve_given and another file by files.existing_file, which the
tuning tools, the sweep and the data module use too."""
from pathlib import Path

from ..errors import UsageError


def refuse_model_folder(path, flag):
    """Refuse a Hugging Face model folder (a config.json and no run.json) where
    a run is expected, saying how to make it one; any other folder is left to
    the run's own checks (RunDir.require_run)."""
    from ..train.rundir import RunDir
    folder = Path(path)
    if (folder / "config.json").is_file() and not RunDir(folder).is_run():
        raise UsageError(f"{flag} {path}: not an xpmodel run (no run.json) but a Hugging Face "
                         f"model folder (config.json); make it a run with: xpmodel import-hf "
                         f"{path} --out RUN_DIR")
