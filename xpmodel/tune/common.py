"""What the tuning tools start from: a config (a shipped name or a YAML path,
with KEY=VALUE overrides) or a run directory, turned into its config,
tokenizer, token streams and fresh model."""
from dataclasses import dataclass
from pathlib import Path

from ..config import load_config, load_config_and_files
from ..data.corpus import build_tokenizer, load_tokens
from ..data.sources import resolve_given
from ..train.rundir import RunDir
from ..train.runs import adopt_pretrained, load_pretrained
from ..train.setup import build_model, gpt_config_for, make_sampler


@dataclass
class Subject:
    """A config to diagnose or tune, and what it trains on."""
    name: str            # for titles: the config's or run's name
    config: object       # RunConfig
    tokenizer: object
    corpus: object                   # data.sources.Source: data.source, resolved once
    config_files: tuple = ()         # the files the config was read from (load_config_and_files)
    pretrained: dict | None = None   # name -> array of train.init_from, else None
    _tokens: tuple | None = None
    _sampler: object = None

    @property
    def sampler(self):
        """The training sampler the trainer would build (train.setup.make_sampler), made once."""
        if self._sampler is None:
            self._sampler = make_sampler(self.config, self.tokenizer, self.tokens[0])
        return self._sampler

    @property
    def tokens(self):
        """(train, val) token arrays, read (and cached) on first use."""
        if self._tokens is None:
            self._tokens = load_tokens(self.config.data, self.tokenizer,
                                       self.config.model.block_size, show_progress=False,
                                       corpus=self.corpus)
        return self._tokens

    @property
    def gpt_config(self):
        return gpt_config_for(self.config, self.tokenizer)

    def model(self, device="cpu", dropout=None, embedding_noise=None):
        """The model the run trains (train.setup.build_model), at its initial
        weights: the seed's, or train.init_from's. `dropout` and
        `embedding_noise` (an alpha) override the config's."""
        model = build_model(self.config, self.tokenizer, device, dropout=dropout,
                            embedding_noise=embedding_noise)
        if self.pretrained is not None:
            model.load_state_arrays(self.pretrained)
        return model


def load_subject(name_or_run, overrides=(), say=print):
    """The Subject of a run directory (its config.yaml, with overrides) or of a
    config name or path (with its `base:` chain). Its data.source is checked
    first, before a tokenizer is trained or a model loaded: one that names
    nothing is a UsageError naming data.source (data.sources.resolve_given)."""
    run = RunDir(name_or_run)
    if run.is_run():
        config = load_config(run.config_path, overrides) if overrides else run.load_config()
        corpus = resolve_given(config.data.source, "data.source")
        return Subject(run.path.name, config, run.load_tokenizer(), corpus, (run.config_path,))
    config, files = load_config_and_files(name_or_run, overrides)
    corpus = resolve_given(config.data.source, "data.source")
    name, files = Path(str(name_or_run)).stem, tuple(files)
    if config.train.init_from:
        source_config, arrays, tokenizer = load_pretrained(config.train.init_from)
        return Subject(name, adopt_pretrained(config, source_config, tokenizer), tokenizer, corpus,
                       files, arrays)
    return Subject(name, config, build_tokenizer(config.data, say=say), corpus, files)
