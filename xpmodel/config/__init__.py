"""The run configuration: YAML files and `KEY=VALUE` overrides turned into typed dataclasses.

A run is described by three sections, each a dataclass: `data` (corpus and
tokenizer), `model` (the network's shape) and `train` (optimizer, schedule,
evaluation, checkpoints). `RunConfig` holds the three.

A config is built in layers, each replacing the keys it names:
  dataclass defaults < `base:` config (recursively) < the YAML file < overrides.
Every key is checked as it is read, so an error names the file or override it
came from; checks that relate several keys run once on the finished config.
The dataclasses also check themselves on construction, so a config built in
code is held to the same rules as one read from YAML.

Every problem raises `UsageError` with a one-line message that names the file
and the dotted key; an unknown key's message lists the section's valid keys.

What the config checks is whether a run could use its settings: each one's
type, range and choices, and the rules between settings that a run would
otherwise fail on or silently ignore (the run's length, warmup and decay
spans, weight decay that would zero the weights, Muon's Newton-Schulz
coefficients, a Muon key set while the optimizer is adamw). What a setting
does is left to the trainer, the data pipeline and the model that read it;
the names of the choices and the vocabulary's bound come from options.py, so
this package imports only the ground floor.

  fields.py      a setting's rules (type, range, choices) and checking a value against them
  sections.py    DataConfig, ModelConfig, TrainConfig, RunConfig; keys looked up by name
  yaml_files.py  shipped configs, bounded reading, the strict YAML loader and its bounds
  load.py        layering, overrides, load_config and its cross-layer policies; writing back
"""
from .load import (DEFAULT_CONFIG, check_override, config_to_dict, config_to_yaml,
                   load_config, load_config_and_files, parse_override_value, save_config)
from .sections import (BATCHINGS, LOG_TO, MAX_BATCH_SIZE, MAX_EVAL_BATCHES, MIN_PEAK_FLOPS, OPTIMIZERS,
                       PRECISIONS, SECTIONS, TOKEN_DROPOUT_MODES, TOKENIZERS, DataConfig, ModelConfig,
                       RunConfig, TrainConfig, check_key, check_value)
from .yaml_files import MAX_CONFIG_BYTES, shipped_configs

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "RunConfig", "SECTIONS", "load_config",
           "load_config_and_files", "config_to_dict", "config_to_yaml",
           "save_config", "shipped_configs", "check_key", "check_value", "check_override",
           "parse_override_value", "DEFAULT_CONFIG", "MAX_CONFIG_BYTES", "MAX_BATCH_SIZE",
           "MAX_EVAL_BATCHES", "MIN_PEAK_FLOPS", "TOKENIZERS", "BATCHINGS", "TOKEN_DROPOUT_MODES",
           "PRECISIONS", "OPTIMIZERS", "LOG_TO"]
