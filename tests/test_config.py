"""Tests for xpmodel.config: shipped configs, overrides, validation messages, save/load."""
import dataclasses
import os
import re
from pathlib import Path

import pytest

from xpmodel.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_key,
    check_override,
    check_value,
    config_to_dict,
    config_to_yaml,
    load_config,
    load_config_and_files,
    parse_override_value,
    save_config,
    shipped_configs,
)
from xpmodel.errors import UsageError

SHIPPED = ("default", "shakespeare-char", "shakespeare-char-cpu", "gpt2-small")
SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def usage_error(*args, **kwargs):
    """The UsageError that load_config raises, checked to be a one-line message."""
    with pytest.raises(UsageError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------
# Shipped configs.

def test_all_shipped_configs_are_listed():
    assert set(SHIPPED) <= set(shipped_configs())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    assert config.model.n_embd % config.model.n_head == 0
    assert (config.train.max_iters is None) != (config.train.epochs is None)


def test_default_is_loaded_without_a_name():
    assert load_config() == load_config("default")


def test_default_config_shape():
    config = load_config("default")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (6, 8, 256)
    assert (config.model.block_size, config.train.batch_size) == (128, 16)
    assert (config.data.tokenizer, config.data.vocab_size, config.data.source) == ("bpe", 4096, "shakespeare")
    assert config.train.lr == 3e-4 and config.train.grad_clip == 1.0
    # Sized to finish within about five minutes at ~2.4 steps/s (5,000 tokens/s) on 2 CPU cores,
    # as the README says.
    assert config.train.max_iters / 2.4 <= 300


def test_shakespeare_char_matches_nanogpt():
    config = load_config("shakespeare-char")
    assert config.data.tokenizer == "byte"
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (6, 6, 384)
    assert (config.model.block_size, config.train.batch_size, config.model.dropout) == (256, 64, 0.2)
    assert (config.train.lr, config.train.min_lr, config.train.beta2) == (1e-3, 1e-4, 0.99)
    assert config.train.max_iters == 5000 and config.train.lr_decay_iters is None   # the run's length
    assert (config.train.eval_interval, config.train.eval_batches) == (250, 200)


def test_cpu_variant_inherits_from_its_base():
    config = load_config("shakespeare-char-cpu")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (4, 4, 128)
    assert (config.model.block_size, config.train.batch_size, config.model.dropout) == (64, 12, 0.0)
    assert config.train.max_iters == 2000 and config.train.lr_decay_iters is None
    # From shakespeare-char, not restated in the CPU file:
    assert config.data.tokenizer == "byte"
    assert (config.train.lr, config.train.min_lr, config.train.beta2) == (1e-3, 1e-4, 0.99)


def test_gpt2_small_shape():
    config = load_config("gpt2-small")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (12, 12, 768)
    assert (config.model.block_size, config.data.vocab_size) == (1024, 50304)
    assert config.train.precision == "fp16"
    assert (config.train.lr, config.train.min_lr) == (6e-4, 6e-5)


def test_dataclass_defaults_are_valid():
    config = RunConfig()
    assert config.data.tokenizer == "bpe" and config.train.max_iters == 5000
    assert config.train.epochs is None


# ---------------------------------------------------------------------------
# YAML files and layering.

def test_file_may_omit_sections_and_keys(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\n")
    config = load_config(path)
    assert config.model.n_layer == 2
    assert config.model.n_embd == ModelConfig().n_embd
    assert config.data == DataConfig()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n...\n", "{}\n", "model:\n",
                                  "model: {}\ntrain:\n"])
def test_an_empty_file_is_refused_as_config_or_base(tmp_path, text):
    empty = write(tmp_path, text)
    with pytest.raises(UsageError, match=f"^{empty}: the config file is empty"):
        load_config(empty)
    top = tmp_path / "top.yaml"
    top.write_text(f"base: {empty}\ntrain:\n  seed: 3\n")
    with pytest.raises(UsageError, match=f"^{empty}: the config file is empty"):
        load_config(top)


def test_a_misspelt_empty_section_is_named_not_taken_for_an_empty_file(tmp_path):
    assert "unknown section 'modle'" in usage_error(write(tmp_path, "modle:\n"))


def test_path_given_as_string(tmp_path):
    path = write(tmp_path, "train:\n  seed: 7\n")
    assert load_config(str(path)).train.seed == 7


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; float fields accept it anyway.
    config = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  min_lr: 0\n"))
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)
    assert config.train.min_lr == 0.0 and isinstance(config.train.min_lr, float)


def test_setting_epochs_replaces_inherited_max_iters(tmp_path):
    config = load_config(write(tmp_path, "train:\n  epochs: 3\n"))
    assert (config.train.epochs, config.train.max_iters) == (3, None)


def test_base_inherits_and_overrides(tmp_path):
    write(tmp_path, "model:\n  n_layer: 3\n  n_head: 4\n", name="parent.yaml")
    path = write(tmp_path, "base: parent.yaml\nmodel:\n  n_head: 2\n")
    config = load_config(path)
    assert (config.model.n_layer, config.model.n_head) == (3, 2)


def test_base_may_name_a_shipped_config(tmp_path):
    config = load_config(write(tmp_path, "base: shakespeare-char\ntrain:\n  max_iters: 300\n"))
    assert (config.model.n_embd, config.train.max_iters) == (384, 300)


def test_base_bare_name_is_read_next_to_the_including_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    write(folder, "model:\n  n_layer: 3\n", name="parent")
    write(tmp_path, "model:\n  n_layer: 5\n", name="parent")     # the working directory's decoy
    monkeypatch.chdir(tmp_path)
    config = load_config(write(folder, "base: parent\n"))
    assert config.model.n_layer == 3


def test_a_missing_base_names_the_file_that_names_it_and_where_it_looked(tmp_path):
    write(tmp_path, "model:\n  n_layer: 1\n", name="mybase.yaml")
    child = write(tmp_path, "base: mybase\n", name="child.yaml")
    with pytest.raises(UsageError, match=re.escape(
            f"{child}: base: unknown config 'mybase': not a shipped config, and no file "
            f"{tmp_path / 'mybase'}; {tmp_path / 'mybase.yaml'} exists: name it as mybase.yaml")):
        load_config(child)


def test_a_folder_named_as_a_config_is_refused_as_one(tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"config 'adir': adir is a directory, not a config file"):
        load_config("adir")


def test_a_config_and_its_files_come_from_one_reading_of_the_base_chain(tmp_path, monkeypatch):
    from config_reads import count_config_reads
    write(tmp_path, "model:\n  n_layer: 3\n", name="grandparent.yaml")
    write(tmp_path, "base: grandparent.yaml\nmodel:\n  n_head: 2\n", name="parent.yaml")
    path = write(tmp_path, "base: parent.yaml\nmodel:\n  n_embd: 32\n")
    reads = count_config_reads(monkeypatch)
    config, files = load_config_and_files(path, ["train.lr=1e-3"])
    assert files == [tmp_path / "grandparent.yaml", tmp_path / "parent.yaml", path]
    assert reads == files[::-1]     # each file once, the config first
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (3, 2, 32)
    assert config == load_config(path, ["train.lr=1e-3"])


def test_base_loop_is_rejected(tmp_path):
    write(tmp_path, "base: b.yaml\n", name="a.yaml")
    write(tmp_path, "base: a.yaml\n", name="b.yaml")
    assert "loops" in usage_error(tmp_path / "a.yaml")


# ---------------------------------------------------------------------------
# Overrides.

def test_overrides_are_typed_by_the_schema():
    config = load_config("default", [
        "model.n_layer=4", "train.lr=1e-3", "train.weight_decay=0", "data.crop_augment=true",
        "data.batching=epochs",
        "data.source=notes.txt", "train.max_iters=200", "data.cache_dir=/tmp/cache",
    ])
    assert config.model.n_layer == 4 and type(config.model.n_layer) is int
    assert config.train.lr == 1e-3 and type(config.train.lr) is float
    assert config.train.weight_decay == 0.0 and type(config.train.weight_decay) is float
    assert config.data.crop_augment is True
    assert config.data.source == "notes.txt"
    assert config.train.max_iters == 200
    assert config.data.cache_dir == "/tmp/cache"


def test_override_string_fields_keep_their_text():
    config = load_config("default", ["data.source=2024", "train.sample_prompt=yes"])
    assert config.data.source == "2024"
    assert config.train.sample_prompt == "yes"


def test_quoted_override_uses_yaml_escapes():
    config = load_config("default", ['train.sample_prompt="ROMEO:\\n"'])
    assert config.train.sample_prompt == "ROMEO:\n"


@pytest.mark.parametrize("word", ["none", "null", "None"])
def test_null_override_clears_an_optional_field(word):
    config = load_config("default", ["train.init_from=run1", f"train.lr_decay_iters={word}"])
    assert config.train.lr_decay_iters is None
    config = load_config("default", [f"train.init_from={word}"])
    assert config.train.init_from is None


def test_epochs_override_replaces_max_iters():
    config = load_config("default", ["train.epochs=2"])
    assert (config.train.epochs, config.train.max_iters) == (2, None)


def test_later_override_of_the_same_key_wins():
    assert load_config("default", ["model.n_layer=2", "model.n_layer=3"]).model.n_layer == 3


def test_single_override_string_is_not_split_into_characters():
    assert load_config("default", "model.n_layer=2").model.n_layer == 2


# ---------------------------------------------------------------------------
# Errors: unknown names.

@pytest.mark.parametrize("section", ["data", "model", "train"])
def test_unknown_key_in_file_lists_valid_keys(tmp_path, section):
    path = write(tmp_path, f"{section}:\n  no_such_key: 1\n")
    message = usage_error(path)
    assert str(path) in message
    assert f"{section}.no_such_key" in message
    for spec in dataclasses.fields(SECTION_CLASSES[section]):
        assert spec.name in message


@pytest.mark.parametrize("section", ["data", "model", "train"])
def test_unknown_key_in_override_lists_valid_keys(section):
    message = usage_error("default", [f"{section}.no_such_key=1"])
    assert f"{section}.no_such_key=1" in message
    for spec in dataclasses.fields(SECTION_CLASSES[section]):
        assert spec.name in message


def test_misspelt_key_gets_a_suggestion():
    assert "did you mean n_layer" in usage_error("default", ["model.n_layers=4"])


@pytest.mark.parametrize("override, suggestion", [
    ("train.dropout=0.0", "did you mean model.dropout?"),
    ("model.lr=1e-3", "did you mean train.lr?"),
    ("train.vocab_size=512", "did you mean data.vocab_size or model.vocab_size?"),
    ("data.warmup_iter=10", "did you mean train.warmup_iters?"),
])
def test_a_key_of_another_section_is_suggested_with_its_section(override, suggestion):
    assert suggestion in usage_error("default", [override])


def test_unknown_section(tmp_path):
    message = usage_error(write(tmp_path, "optim:\n  lr: 0.1\n"))
    assert "'optim'" in message and "data, model, train" in message


@pytest.mark.parametrize("text, shown", [
    ("model: {1: 2}\n", "the key 1 (YAML reads it as a number, not text) under model"),
    ("model:\n  null: 2\n", "the key null (YAML reads it as null, not text) under model"),
    ("train:\n  true: 2\n", "the key true (YAML reads it as a boolean, not text) under train"),
    ("data:\n  2024-01-01: 3\n", "the key 2024-01-01 (YAML reads it as a date, not text) under data"),
    ("train:\n  1.5: 2\n", "the key 1.5 (YAML reads it as a number, not text) under train"),
    ("null: 1\n", "unknown section null (YAML reads it as null, not text)"),
    ("2024-01-01: {a: 1}\n", "unknown section 2024-01-01 (YAML reads it as a date, not text)"),
])
def test_a_key_that_yaml_reads_as_no_text_is_named(tmp_path, text, shown):
    path = write(tmp_path, text)
    message = usage_error(path)
    assert message.startswith(f"{path}: {shown}")


@pytest.mark.parametrize("override", ["optim.lr=0.1", "n_layer=4"])
def test_override_without_a_section(override):
    message = usage_error("default", [override])
    assert override in message and "SECTION.KEY" in message


def test_override_without_equals_sign():
    message = usage_error("default", ["model.n_layer"])
    assert "'model.n_layer'" in message and "KEY=VALUE" in message


def test_unknown_config_name_lists_shipped_names():
    message = usage_error("no-such-config")
    assert "'no-such-config'" in message
    for name in SHIPPED:
        assert name in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    message = usage_error(path)
    assert str(path) in message and "no such config file" in message


# ---------------------------------------------------------------------------
# Errors: malformed YAML.

def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 4\n  n_head: [8\ntrain:\n  lr: 0.1\n")
    message = usage_error(path)
    assert str(path) in message and "invalid YAML" in message
    assert "line 4" in message


def test_duplicate_key_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 4\n  n_layer: 5\n")
    message = usage_error(path)
    assert str(path) in message and "duplicate key 'n_layer'" in message and "line 3" in message


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    message = usage_error(path)
    assert str(path) in message and "mapping" in message


def test_section_must_be_a_mapping(tmp_path):
    message = usage_error(write(tmp_path, "model: 4\n"))
    assert "section model" in message and "mapping" in message


# ---------------------------------------------------------------------------
# Errors: wrong types.

@pytest.mark.parametrize("override, expected", [
    ("model.n_layer=abc", "model.n_layer must be an integer"),
    ("model.n_layer=2.5", "model.n_layer must be an integer"),
    ("model.n_layer=true", "model.n_layer must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.lr=false", "train.lr must be a number"),
    ("data.crop_augment=1", "data.crop_augment must be true or false"),
    ("data.crop_augment=maybe", "data.crop_augment must be true or false"),
    ("train.max_iters=ten", "train.max_iters must be an integer or null"),
    ("train.lr=nan", "train.lr must be a finite number"),
])
def test_wrong_type_in_override(override, expected):
    assert expected in usage_error("default", [override])


def test_bool_is_not_an_integer_in_a_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: true\n")
    message = usage_error(path)
    assert str(path) in message and "train.batch_size must be an integer" in message and "bool" in message


def test_number_is_not_a_string_in_a_file(tmp_path):
    message = usage_error(write(tmp_path, "data:\n  source: 12\n"))
    assert "data.source must be a string" in message


@pytest.mark.parametrize("override", ["model.n_layer=null", "data.source=none", "train.lr=~"])
def test_null_only_for_optional_fields(override):
    key = override.split("=")[0]
    assert f"{key} must be" in usage_error("default", [override])


# ---------------------------------------------------------------------------
# Errors: impossible values.

@pytest.mark.parametrize("override", [
    "model.n_layer=0", "model.n_head=-1", "model.n_embd=0", "model.block_size=-8",
    "train.batch_size=0", "train.grad_accum=0", "train.max_iters=0", "train.lr=0",
    "train.lr=-1e-3", "train.min_lr=-1e-5", "train.warmup_iters=-1", "train.weight_decay=-0.1",
    "train.eps=0", "train.grad_clip=-1", "train.eval_interval=0", "train.eval_batches=0",
    "train.sample_interval=-1", "train.save_interval=0", "train.log_interval=0",
    "train.keep_last=0", "train.early_stop_patience=-1", "train.lr_decay_iters=0",
    "train.seed=-5", "data.vocab_size=255", "data.val_fraction=0", "data.val_fraction=1",
    "model.dropout=1", "model.dropout=-0.1", "data.token_dropout=1.5", "train.beta2=1",
])
def test_out_of_range_value(override):
    key, value = override.split("=")
    message = usage_error("default", [override])
    assert f"override '{override}'" in message and f"{key} must be" in message


@pytest.mark.parametrize("override", ["train.sample_interval=0", "train.grad_clip=0",
                                      "train.early_stop_patience=0", "train.warmup_iters=0",
                                      "data.token_dropout=0", "model.dropout=0"])
def test_zero_is_allowed_where_it_means_off(override):
    section, key = override.partition("=")[0].split(".")
    assert getattr(getattr(load_config("default", [override]), section), key) == 0


@pytest.mark.parametrize("override, choice_key", [
    ("data.tokenizer=char", "data.tokenizer"), ("data.batching=sequential", "data.batching"),
    ("train.schedule=exponential", "train.schedule"), ("train.precision=fp8", "train.precision"),
])
def test_choice_outside_its_choices(override, choice_key):
    message = usage_error("default", [override])
    assert f"{choice_key} must be one of" in message


def test_embedding_width_must_divide_into_heads(tmp_path):
    path = write(tmp_path, "model:\n  n_embd: 250\n  n_head: 8\n")
    message = usage_error(path)
    assert str(path) in message and "model.n_embd (250)" in message and "model.n_head (8)" in message


def test_an_error_names_a_shipped_config_by_its_name_and_a_file_by_its_path(tmp_path):
    """Not by the folder the package is installed in (site-packages/xpmodel/configs/...)."""
    message = usage_error("default", ["model.n_head=5"])
    assert message.startswith("default with overrides: model.n_embd (256) must be divisible by "
                              "model.n_head (5)")
    installed = load_config_and_files("default")[1][0]     # the file read is still the package's
    assert installed.name == "default.yaml" and str(installed) not in message
    path = write(tmp_path, "base: shakespeare-char-cpu\nmodel:\n  n_head: 5\n")
    assert usage_error(path).startswith(f"{path}: model.n_embd (128) must be divisible")
    assert usage_error(path, ["train.lr=1e-3"]).startswith(f"{path} with overrides: ")


def test_min_lr_above_lr():
    message = usage_error("default", ["train.min_lr=1e-3"])
    assert "train.min_lr" in message and "train.lr" in message and "with overrides" in message


def test_warmup_longer_than_the_run():
    message = usage_error("default", ["train.warmup_iters=900", "train.max_iters=800"])
    assert "train.warmup_iters (900)" in message and "train.max_iters" in message


def test_weight_decay_that_would_zero_or_flip_the_weights():
    """AdamW's decay multiplies the matrices by 1 - lr * weight_decay at the peak lr."""
    message = usage_error("default", ["train.lr=0.01", "train.weight_decay=100"])
    assert "train.lr * train.weight_decay = 1 must be below 1" in message
    assert "lower train.weight_decay below 100" in message
    load_config("default", ["train.lr=0.01", "train.weight_decay=99"])


@pytest.mark.parametrize("value", ["989", "1e10"])
def test_peak_flops_below_0_1_tflops_is_taken_for_the_wrong_unit(value):
    message = usage_error("default", [f"train.peak_flops={value}"])
    assert f"train.peak_flops={float(value):g} is too small: it is in FLOP/s, not TFLOP/s" in message
    assert "989e12 for an H100" in message


def test_peak_flops_in_flops_is_accepted():
    assert load_config("default", ["train.peak_flops=989e12"]).train.peak_flops == 989e12
    assert load_config("default", ["train.peak_flops=1e11"]).train.peak_flops == 1e11


def test_warmup_longer_than_the_decay():
    assert "train.lr_decay_iters" in usage_error("default", ["train.lr_decay_iters=50"])


def test_both_run_lengths_set(tmp_path):
    message = usage_error(write(tmp_path, "train:\n  max_iters: 100\n  epochs: 2\n"))
    assert "train.max_iters and train.epochs are both set" in message


def test_neither_run_length_set():
    message = usage_error("default", ["train.max_iters=null"])
    assert "train.max_iters and train.epochs are both unset" in message


def test_error_is_a_value_error_with_usage_exit_code():
    with pytest.raises(ValueError) as info:
        load_config("default", ["model.n_layer=0"])
    assert info.value.exit_code == 2


def test_dataclasses_check_themselves():
    with pytest.raises(UsageError, match="model.n_embd"):
        ModelConfig(n_embd=100, n_head=8)
    with pytest.raises(UsageError, match="train.batch_size must be an integer"):
        TrainConfig(batch_size=True)
    assert TrainConfig(lr=1).lr == 1.0 and type(TrainConfig(lr=1).lr) is float


# ---------------------------------------------------------------------------
# Saving and reading back.

def test_config_to_dict_has_every_field():
    document = config_to_dict(RunConfig())
    assert list(document) == ["data", "model", "train"]
    for section, cls in SECTION_CLASSES.items():
        assert list(document[section]) == [spec.name for spec in dataclasses.fields(cls)]
    assert document["train"]["sample_prompt"] == "\n"


@pytest.mark.parametrize("name", SHIPPED)
def test_save_and_load_roundtrip(tmp_path, name):
    config = load_config(name, ["train.sample_prompt=\"To be: \\n'or'\"", "data.cache_dir=/tmp/x y"])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert os.listdir(tmp_path) == ["config.yaml"]    # no temporary file left behind


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config("default"), path)
    changed = load_config("default", ["model.n_layer=2", "train.epochs=1"])
    save_config(changed, path)
    assert load_config(path) == changed


def test_config_to_yaml_is_what_save_config_writes(tmp_path):
    config = load_config("shakespeare-char-cpu", ["train.sample_prompt=yes: no"])
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert path.read_text(encoding="utf-8") == config_to_yaml(config)
    assert load_config(path) == config


# ---------------------------------------------------------------------------
# Reading one KEY=VALUE, as overrides and sweep SPECs do.

@pytest.mark.parametrize("dotted, message", [
    ("train.lrr", "unknown key train.lrr (did you mean lr?); valid train keys: batch_size, "),
    ("model.lr", "did you mean train.lr?"),
    ("optim.lr", "the key must be SECTION.KEY with SECTION one of data, model, train"),
    ("train", "unknown key train."),
])
def test_check_key_names_the_key_and_the_valid_ones(dotted, message):
    with pytest.raises(UsageError) as info:
        check_key(dotted)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_check_key_gives_section_and_key():
    assert check_key(" model.n_layer ") == ("model", "n_layer")


@pytest.mark.parametrize("dotted, raw, value", [
    ("train.lr", "3e-4", 3e-4),             # YAML 1.1 leaves it a string; the field reads a number
    ("train.recompute", "none", "none"),    # a choice's name, not null
    ("train.lr_decay_iters", "null", None),
    ("data.source", "2024.txt", "2024.txt"),
    ("train.sample_prompt", "yes", "yes"),
    ("train.log_to", "tensorboard,wandb", ["tensorboard", "wandb"]),
])
def test_parse_override_value_reads_text_as_its_key_does(dotted, raw, value):
    section, key = check_key(dotted)
    assert check_value(section, key, parse_override_value(section, key, raw)) == value


def test_parse_override_value_keeps_the_yaml_bounds():
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 2000) + "]"
    with pytest.raises(UsageError, match=r"^train\.lr: YAML with more than 10,000 values"):
        parse_override_value("train", "lr", bomb)
    with pytest.raises(UsageError, match=r"^override 'train\.lr=\[.*: train\.lr: YAML with more"):
        load_config("default", [f"train.lr={bomb}"])
    # check_override names the key; its caller (a SPEC, a sweep's fixed settings) names the text
    with pytest.raises(UsageError, match=r"^train\.lr: YAML with more than 10,000 values"):
        check_override(f"train.lr={bomb}")


def test_a_sweep_spec_reads_its_values_as_overrides_do():
    from xpmodel.tune.sweep_plan import parse_spec
    assert parse_spec("train.lr=1e-4,3e-4").values == [1e-4, 3e-4]
    assert parse_spec("train.recompute=none,mlp").values == ["none", "mlp"]
    assert parse_spec("train.batch_size=2,4").values == [2, 4]
    for spec, message in [
            ("train.lrr=1,2", "SPEC 'train.lrr=1,2': unknown key train.lrr (did you mean lr?)"),
            ("optim.lr=1,2", "SPEC 'optim.lr=1,2': the key must be SECTION.KEY"),
            ("train.lr=" + "[" * 20 + "]" * 20,
             "SPEC 'train.lr=" + "[" * 20 + "]" * 20 + "': train.lr: YAML nested more than 16 levels"),
            ("train.max_iters=1e3", "train.max_iters must be an integer or null, got '1e3'")]:
        with pytest.raises(UsageError) as info:
            parse_spec(spec)
        assert message in str(info.value) and "\n" not in str(info.value)


# ---- sizes bounded before anything is allocated -----------------------------------------

@pytest.mark.parametrize("override, message", [
    ("data.vocab_size=99999999", "data.vocab_size=99999999 is more than the 1,048,576 ids"),
    ("train.batch_size=1000000000000", "train.batch_size must be in (0, 16,777,216]"),
    ("train.eval_batches=1000000000000", "train.eval_batches must be in (0, 16,777,216]"),
])
def test_sizes_beyond_any_machine_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("default", [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=16000000", "model.block_size=4096"],
     "train.batch_size=16000000: a batch of 16,000,000 windows of 4,096 tokens needs about"),
    (["train.batch_size=1000000", "train.eval_batches=16000000"],
     "train.eval_batches=16000000: an evaluation's 16,000,000,000,000 window starts"),
])
def test_train_refuses_batches_larger_than_memory_before_writing(tmp_path, monkeypatch, capsys,
                                                                 overrides, message):
    from cli_helpers import assert_one_line_error, run_cli
    import xpmodel.train.setup as setup
    monkeypatch.setattr(setup, "_host_memory", lambda: 8 << 30)
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("hello world\n" * 2000)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", Path(__file__).parent / "tiny-run.yaml", "--out", out,
                           f"data.source={tmp_path / 'corpus.txt'}", *overrides)
    assert code == 2
    assert_one_line_error(err)
    assert message in err and "more than this machine's 8.0 GiB" in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_number_past_float_range_is_refused_naming_its_key(tmp_path):
    message = usage_error(write(tmp_path, "train:\n  lr: 1" + "0" * 400 + "\n"))
    assert "train.lr" in message and "run.yaml" in message


# ---- values a run would accept and then fail on, or train nonsense with ------------------

@pytest.mark.parametrize("seed", [2**63, 10**29])
def test_a_seed_past_what_a_checkpoint_holds_is_refused_naming_the_key(seed):
    message = usage_error("default", [f"train.seed={seed}"])
    assert "train.seed must be in [0, 9,223,372,036,854,775,807]" in message


def test_the_largest_seed_is_one_a_checkpoint_sampler_state_takes_back():
    import numpy
    from xpmodel.config.sections import MAX_SEED
    from xpmodel.data.batching import RandomWindowSampler, check_sampler_state
    assert load_config("default", [f"train.seed={MAX_SEED}"]).train.seed == MAX_SEED
    sampler = RandomWindowSampler(numpy.arange(64), batch_size=2, block_size=8, seed=MAX_SEED)
    sampler.next_batch()
    check_sampler_state(sampler.state_dict())


@pytest.mark.parametrize("key", ["data.cache_dir", "train.init_from", "data.source", "train.sample_prompt"])
def test_a_nul_in_a_string_setting_is_refused_naming_the_key(tmp_path, key):
    section, name = key.split(".")
    path = write(tmp_path, f'{section}:\n  {name}: "/x\\0y"\n')
    assert f"{key} holds a NUL character" in usage_error(path)
    for override in [f"{key}=/x\0y", f'{key}="/x\\0y"']:
        message = usage_error("default", [override])
        assert f"override {override!r}: {key} holds a NUL character" in message


def test_a_nul_in_a_list_of_strings_is_refused_naming_the_item():
    assert "train.log_to[1] holds a NUL character" in usage_error("default", ["train.log_to=tensorboard,w\0"])


def test_other_control_characters_stay_legal_in_strings(tmp_path):
    config = load_config(write(tmp_path, 'data:\n  cache_dir: "/x\\ty\\x01"\ntrain:\n  sample_prompt: "a\\nb"\n'))
    assert (config.data.cache_dir, config.train.sample_prompt) == ("/x\ty\x01", "a\nb")


def test_a_nul_in_a_config_name_or_base_is_refused_naming_it(tmp_path):
    assert "config '/x\\x00y.yaml': no file name holds a NUL character" in usage_error("/x\0y.yaml")
    assert "config 'de\\x00fault': no file name" in usage_error(write(tmp_path, 'base: "de\\0fault"\n'))


@pytest.mark.parametrize("override, message", [
    ("model.norm_eps=1e308", "model.norm_eps must be in (0, 1], got 1e+308"),
    ("model.norm_eps=1e10", "model.norm_eps must be in (0, 1]"),
    ("model.norm_eps=0", "model.norm_eps must be in (0, 1]"),
    ("train.eps=1e24", "train.eps must be in (0, 1], got 1e+24"),
    ("train.eps=1.5", "train.eps must be in (0, 1]"),
    ("train.embedding_noise=1e30", "train.embedding_noise must be in [0, 1000], got 1e+30"),
    ("train.embedding_noise=1000.5", "train.embedding_noise must be in [0, 1000]"),
    ("train.grad_accum=" + str(10**30), "train.grad_accum must be in (0, 16,777,216]"),
    ("train.grad_accum=16777217", "train.grad_accum must be in (0, 16,777,216]"),
])
def test_values_that_would_train_nonsense_are_refused_naming_the_key(override, message):
    assert message in usage_error("default", [override])


def test_the_upper_bounds_themselves_are_accepted(tmp_path):
    config = load_config(write(tmp_path, "model:\n  norm_eps: 1\ntrain:\n  eps: 1\n  embedding_noise: 1000\n"
                                         "  grad_accum: 16777216\n"))
    assert (config.model.norm_eps, config.train.eps) == (1.0, 1.0)
    assert (config.train.embedding_noise, config.train.grad_accum) == (1000.0, 2**24)


@pytest.mark.parametrize("key, text, message", [
    ("model.n_layer", "1:2", "model.n_layer must be an integer, got '1:2' (str)"),
    ("train.max_iters", "-1:30:00", "train.max_iters must be an integer or null, got '-1:30:00' (str)"),
    ("train.lr", "1:30.5", "train.lr must be a number, got '1:30.5' (str)"),
    ("model.n_layer", "010", "model.n_layer must be an integer, got '010' (str)"),
    ("train.max_iters", "0100", "train.max_iters must be an integer or null, got '0100' (str)"),
])
def test_a_base_60_number_is_text_that_a_number_key_refuses(tmp_path, key, text, message):
    section, name = key.split(".")
    assert message in usage_error(write(tmp_path, f"{section}:\n  {name}: {text}\n"))
    assert message in usage_error("default", [f"{key}={text}"])


def test_a_base_60_number_is_kept_as_text_by_a_string_key(tmp_path):
    assert load_config(write(tmp_path, "data:\n  source: 12:30\n")).data.source == "12:30"
    assert load_config("default", ["data.source=12:30"]).data.source == "12:30"
    assert "train.log_to must be one of tensorboard, wandb; got '12:30'" in usage_error(
        write(tmp_path, "train:\n  log_to: [12:30]\n"))


@pytest.mark.parametrize("text, value", [("0x10", 16), ("1_000", 1000), ("0b11", 3)])
def test_the_other_yaml_1_1_integer_forms_still_read(tmp_path, text, value):
    assert load_config(write(tmp_path, f"model:\n  n_layer: {text}\n")).model.n_layer == value
    assert load_config("default", [f"model.n_layer={text}"]).model.n_layer == value


# ---- keys that apply only under another key's choice ------------------------------------

@pytest.mark.parametrize("override, chooser, chosen, choice", [
    ("model.rope_theta=500000", "model.position", "learned", "rope"),
    ("train.gamma=0.5", "train.schedule", "cosine", "step"),
    ("train.step_size=100", "train.schedule", "cosine", "step"),
    ("train.decay_fraction=0.3", "train.schedule", "cosine", "wsd"),
    ("train.muon_lr=0.05", "train.optimizer", "adamw", "muon"),
])
def test_a_key_that_would_be_ignored_is_refused_naming_its_chooser(tmp_path, override, chooser,
                                                                   chosen, choice):
    key = override.partition("=")[0]
    with pytest.raises(UsageError, match=re.escape(
            f"override '{override}': {key} is set but {chooser} is {chosen} (it applies with "
            f"{chooser}={choice})")):
        load_config("default", [override])
    # chosen together, in the same layer or a later one, it applies
    load_config("default", [override, f"{chooser}={choice}"])
    section, _, name = key.partition(".")
    value = override.partition("=")[2]
    both = write(tmp_path, f"{section}:\n  {name}: {value}\n", name="both.yaml")
    with pytest.raises(UsageError, match=re.escape(f"{both}: {key} is set but {chooser}")):
        load_config(both)
    both.write_text(f"base: default\n{section}:\n  {name}: {value}\n" +
                    (f"  {chooser.partition('.')[2]}: {choice}\n" if chooser.startswith(section)
                     else f"{chooser.partition('.')[0]}:\n  {chooser.partition('.')[2]}: {choice}\n"))
    load_config(both)
    # a layer that chooses otherwise on purpose keeps the keys below it
    load_config(both, [f"{chooser}={chosen}"])


def test_a_noise_kind_without_noise_is_refused_and_applies_with_it():
    with pytest.raises(UsageError, match=re.escape(
            "train.embedding_noise_kind is set but train.embedding_noise is 0.0 (it applies with "
            "train.embedding_noise above 0)")):
        load_config("default", ["train.embedding_noise_kind=gaussian"])
    assert load_config("default", ["train.embedding_noise_kind=gaussian",
                                   "train.embedding_noise=5"]).train.embedding_noise_kind == "gaussian"


def test_a_vocab_size_for_the_byte_tokenizer_is_refused(tmp_path):
    byte = write(tmp_path, "base: default\ndata:\n  tokenizer: byte\n", name="byte.yaml")
    with pytest.raises(UsageError, match=r"data.vocab_size is set but data.tokenizer is byte"):
        load_config(byte, ["data.vocab_size=512"])


@pytest.mark.parametrize("key", ["data.source", "train.init_from", "data.cache_dir"])
def test_a_path_key_given_empty_is_refused_not_taken_for_none(tmp_path, key):
    assert f"{key} must not be empty" in usage_error("default", [f"{key}="])
    section, name = key.split(".")
    assert f"{key} must not be empty" in usage_error(write(tmp_path, f"{section}:\n  {name}: ''\n"))
