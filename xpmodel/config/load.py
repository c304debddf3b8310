"""Building a run config: `base:` layers, the YAML file and `KEY=VALUE`
overrides laid over the defaults, then checked whole; and writing one back.

A config is built in layers, each replacing the keys it names:
  dataclass defaults < `base:` config (recursively) < the YAML file < overrides.
Every key is checked as it is read, so an error names the file or override it
came from; the rules that relate several keys run once on the finished
config, blaming its file. Two policies span layers: a layer that shortens the
run scales the schedule it inherited (_fit_schedule), and a Muon key that
adamw would ignore is refused (_check_muon_keys_apply).
"""
import dataclasses
import typing
from pathlib import Path

import yaml

from ..atomic import atomic_write_bytes
from ..errors import UsageError, quote
from .sections import (SECTIONS, RunConfig, TrainConfig, field_types, fields_by_name,
                       unknown_key_message, unknown_section_message, check_key, check_value)
from .yaml_files import StrictLoader, check_yaml_bounds, locate, parse_yaml, shipped_dir

DEFAULT_CONFIG = "default"
_MAX_BASE_DEPTH = 16    # deeper `base:` chains are almost surely a mistake
# Alternative ways to say how long to train: a layer that sets one clears the
# other, so `epochs: 3` over a base that sets max_iters means what it says.
_RUN_LENGTH_KEYS = ("max_iters", "epochs")


# ---------------------------------------------------------------------------
# Layering: each layer is a {section: {key: value}} mapping checked key by key.

def _read_layers(name_or_path, relative_to=None, chain=()):
    """Return [(label, path, document)] for a config and its `base:` ancestors,
    oldest first: `path` is the file read, `label` names it in messages
    (_label); `chain` holds the paths of the configs that led here."""
    path, text = locate(name_or_path, relative_to)
    label = _label(name_or_path, path)
    if path in chain:
        raise UsageError(f"{label}: `base:` chain loops back on itself ({' -> '.join((*chain, path))})")
    if len(chain) >= _MAX_BASE_DEPTH:
        raise UsageError(f"{label}: `base:` chain deeper than {_MAX_BASE_DEPTH} configs")
    document = parse_yaml(text, label)
    base = document.get("base")
    if base is None:
        return [(label, path, document)]
    if not isinstance(base, str) or not base:
        raise UsageError(f"{label}: base must be a config name or path, got {quote(base, 60)}")
    # A relative base path is read next to the file that names it.
    try:
        ancestors = _read_layers(base, Path(path).parent, (*chain, path))
    except UsageError as exc:
        if not str(exc).startswith("unknown config"):
            raise
        raise UsageError(f"{label}: base: {exc}") from None
    return ancestors + [(label, path, document)]


def _label(name_or_path, path):
    """How messages name the config file `path` that `name_or_path` was found
    as: a shipped config by its name ("default"), not by where the package is
    installed; a user's file by its path as given."""
    name = str(name_or_path)
    return name if path == str(shipped_dir().joinpath(name + ".yaml")) else path


def _apply_document(merged, document, label):
    """Check a parsed YAML document's sections and keys and lay them over `merged`."""
    for section, values in document.items():
        if section == "base":
            continue
        if section not in SECTIONS:
            raise UsageError(f"{label}: {unknown_section_message(section)}")
        if values is None:      # `model:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise UsageError(
                f"{label}: section {section} must be a mapping of keys, got {quote(values, 60)}")
        _apply_values(merged, section, values, {key: label for key in values})


def _apply_values(merged, section, values, labels):
    """Check each key of one section and lay the values over `merged`."""
    valid = fields_by_name(section)
    checked = {}
    for key, value in values.items():
        if key not in valid:
            raise UsageError(f"{labels[key]}: {unknown_key_message(section, key)}")
        try:
            checked[key] = check_value(section, key, value)
        except UsageError as exc:
            raise UsageError(f"{labels[key]}: {exc}") from None
    target = merged.setdefault(section, {})
    if section == "train":
        named = [key for key in _RUN_LENGTH_KEYS if key in checked]
        if len(named) == 1:
            for other in _RUN_LENGTH_KEYS:
                target[other] = None
    target.update(checked)


def _build(merged, label):
    """Construct the dataclasses, blaming `label` for any rule that spans several keys."""
    try:
        return RunConfig(**{name: cls(**merged.get(name, {})) for name, cls in SECTIONS.items()})
    except UsageError as exc:
        raise UsageError(f"{label}: {exc}") from None


# ---------------------------------------------------------------------------
# Overrides: `section.key=value` strings from the command line.

def parse_override_value(section, key, raw):
    """The value the text `raw` gives `section.key` in an override: read as a
    config file's YAML is (the same loader, within the same bounds), but kept
    literal where it names one of the key's choices (train.recompute=none is
    the mode, not null) or the key is a string. Not yet checked against the
    key: check_value does that. A UsageError (a value past the YAML bounds)
    names the key."""
    choices = fields_by_name(section)[key].metadata.get("choices") or ()
    if raw.strip() in choices:
        return raw.strip()
    annotation = field_types(section)[key]
    if raw.strip().lower() in ("none", "null", "~"):
        return None
    kinds = () if typing.get_origin(annotation) is list else \
        typing.get_args(annotation) or (annotation,)     # a list: `[a, b]` or `a,b`
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    # `data.source=2024.txt` or `train.sample_prompt=yes` mean the text itself;
    # quoting (`'"\n"'`) opts into YAML escapes.
    if str in kinds and not quoted:
        return raw
    try:
        check_yaml_bounds(raw, f"{section}.{key}")
        return yaml.load(raw, Loader=StrictLoader)
    except UsageError:
        raise
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return raw      # not YAML; the type check names it


def _parse_override(text):
    """(section, key, value) of `section.key=value`, the value typed by its
    field (parse_override_value) but not yet checked; a UsageError names the key."""
    if not isinstance(text, str) or "=" not in text:
        raise UsageError("expected KEY=VALUE, e.g. model.n_layer=4")
    dotted, _, raw = text.partition("=")
    section, key = check_key(dotted)
    return section, key, parse_override_value(section, key, raw)


def check_override(text):
    """(dotted key, value) of one `section.key=value` override, its value read
    as load_config reads it and checked against that key alone (type, range,
    choices), or a one-line UsageError naming the key (the caller names the
    override: a SPEC, a sweep's fixed settings); rules that relate several
    keys wait for load_config."""
    section, key, value = _parse_override(text)
    return f"{section}.{key}", check_value(section, key, value)


def _apply_overrides(merged, overrides):
    by_section = {}
    for text in overrides:
        label = f"override {quote(text, 200)}"
        try:
            section, key, value = _parse_override(text)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        values, labels = by_section.setdefault(section, ({}, {}))
        values[key], labels[key] = value, label
    for section, (values, labels) in by_section.items():
        _apply_values(merged, section, values, labels)


# ---------------------------------------------------------------------------
# Public entry points.

def load_config(name_or_path=None, overrides=(), notify=None):
    """Read a shipped config by name (default: "default") or a YAML file, then apply overrides.

    A layer that shortens train.max_iters below the warmup_iters or
    lr_decay_iters of the layers under it, without setting those itself,
    has them scaled to fit (see `_fit_schedule`); notify(text) is told.
    """
    return load_config_and_files(name_or_path, overrides, notify)[0]


def load_config_and_files(name_or_path=None, overrides=(), notify=None):
    """(config, files): load_config's config and the files it was read from,
    from one reading of each file: its `base:` chain, oldest first, then the
    config itself (a shipped config is its file in the package). A command
    counts them all among its inputs, so that no output of it is written
    over one."""
    if isinstance(overrides, str):     # one override, not its characters
        overrides = (overrides,)
    merged = {}
    layers = _read_layers(DEFAULT_CONFIG if name_or_path is None else name_or_path)
    layer_keys = []     # per layer, {dotted key it sets: label to blame}
    notes = []          # told once the whole config is known to be valid
    for label, _, document in layers:
        before = dict(merged.get("train", {}))
        _apply_document(merged, document, label)
        layer_keys.append({f"{section}.{key}": label for section, values in document.items()
                           if section in SECTIONS and isinstance(values, dict) for key in values})
        notes += _fit_schedule(merged, before, _train_keys(layer_keys[-1]))
    before = dict(merged.get("train", {}))
    _apply_overrides(merged, overrides)
    layer_keys.append({str(text).partition("=")[0].strip(): f"override {quote(text, 200)}"
                       for text in overrides})
    notes += _fit_schedule(merged, before, _train_keys(layer_keys[-1]))
    label = layers[-1][0] + (" with overrides" if overrides else "")
    config = _build(merged, label)
    _check_dependent_keys_apply(config, layer_keys)
    for note in notes if notify is not None else ():
        notify(note)
    return config, [Path(path) for _, path, _ in layers]


def _train_keys(keys):
    """The names of the train.* keys among dotted `keys`."""
    return {key.partition(".")[2] for key in keys if key.startswith("train.")}


def _equals(choice):
    """(whether a choosing key's value is `choice`, that as text)"""
    return lambda value: value == choice, f"={choice}"


_ABOVE_ZERO = (lambda value: value > 0, " above 0")

# Keys that apply only under another key's choice: (whether a dotted key is one
# of them, the choosing key, (whether its value applies them, that as text)).
_DEPENDENT_KEYS = (
    (lambda key: key.startswith("train.muon_"), "train.optimizer", _equals("muon")),
    (lambda key: key == "model.rope_theta", "model.position", _equals("rope")),
    (lambda key: key in ("train.step_size", "train.gamma"), "train.schedule", _equals("step")),
    (lambda key: key == "train.decay_fraction", "train.schedule", _equals("wsd")),
    (lambda key: key == "data.vocab_size", "data.tokenizer", _equals("bpe")),
    (lambda key: key == "train.embedding_noise_kind", "train.embedding_noise", _ABOVE_ZERO),
)


def _check_dependent_keys_apply(config, layer_keys):
    """Refuse a key that would be ignored (_DEPENDENT_KEYS: train.muon_lr while
    train.optimizer is adamw, model.rope_theta with learned positions): set by
    a layer (a file, or the overrides together) that does not choose the
    choosing key itself, with no later layer choosing it. A layer that chooses
    keeps its dependent keys: a saved run config spells out every key, and
    `train.optimizer=adamw` over a Muon config switches optimizers on purpose."""
    for is_dependent, chooser, (applies, when) in _DEPENDENT_KEYS:
        chosen = setting_value(config, chooser)
        if applies(chosen):
            continue
        for keys in reversed(layer_keys):
            if chooser in keys:
                break
            dependent = [key for key in keys if is_dependent(key)]
            if dependent:
                raise UsageError(f"{keys[dependent[0]]}: {dependent[0]} is set but {chooser} is "
                                 f"{chosen} (it applies with {chooser}{when})")


def _fit_schedule(merged, before, named):
    """Scale warmup_iters and lr_decay_iters to a run that a layer made shorter;
    returns the notes saying so (none or one).

    `xpmodel train train.max_iters=60` over a config with warmup_iters: 100
    means "the same run, shorter": a warmup or decay longer than the new run
    is scaled by its new length over its old (100 of 700 steps becomes 9 of
    60); one that fits is kept. A value the same layer sets is the user's and
    is never changed; a conflict then is an error.
    """
    if "max_iters" not in named:
        return []
    train = merged.setdefault("train", {})
    steps = train.get("max_iters")
    if steps is None:
        return []
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
    old_steps = before.get("max_iters", defaults["max_iters"])
    if old_steps is not None and steps >= old_steps:
        return []   # not shorter: a decay set past the run's end (to extend it later) stays
    scale = steps / old_steps if old_steps else None
    changed = []
    warmup = train.get("warmup_iters", defaults["warmup_iters"])
    if "warmup_iters" not in named and warmup > steps:
        warmup = min(steps, round(warmup * scale)) if scale else steps // 10
        train["warmup_iters"] = warmup
        changed.append(f"train.warmup_iters={warmup}")
    decay = train.get("lr_decay_iters", defaults["lr_decay_iters"])
    if "lr_decay_iters" not in named and decay is not None and decay > steps:
        decay = max(warmup, min(steps, round(decay * scale))) if scale else steps
        train["lr_decay_iters"] = decay
        changed.append(f"train.lr_decay_iters={decay}")
    if not changed:
        return []
    return [f"note: train.max_iters={steps} is shorter than the schedule it was given, so "
            f"{' and '.join(changed)} (the same share of the run; set them to choose)"]


def setting_value(config, key):
    """The value of a dotted `key`, "train.lr" say, in the RunConfig `config`."""
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def config_to_dict(config):
    """The config as plain {section: {key: value}} data, in field order."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in SECTIONS}


def config_to_yaml(config):
    """The config as YAML text, every key spelled out in field order, that
    load_config reads back equal: what save_config writes and the metric
    mirrors (train/mirrors.py) show."""
    return ("# xpmodel run config, complete: every key is spelled out.\n"
            + yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def save_config(config, path):
    """Write config_to_yaml(config) to `path`, atomically."""
    atomic_write_bytes(Path(path), config_to_yaml(config).encode("utf-8"))
