"""Hugging Face GPT-2 (`GPT2LMHeadModel`) as one family of xpmodel.hf.convert.

xpmodel's parameter names are GPT2LMHeadModel's without "transformer.", and
its weights are (in, out) as Hugging Face's Conv1D stores them, so every
tensor maps to itself. GPT-2's options are xpmodel's defaults; its MLP width
(n_inner), LayerNorm epsilon and an untied head (tie_word_embeddings false,
with lm_head.weight) carry over too.
"""
from ..checks import HALF_OPEN_UNIT, check_number
from ..errors import DataError, UsageError, quote
from ..model.params import parameter_shapes

ARCHITECTURE = "GPT2LMHeadModel"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
MODEL_TYPE = "gpt2"
EMBEDDING = "transformer.wte.weight"
# The start of every name of layer i's tensors, with i for {}.
LAYER_PREFIX = "transformer.h.{}."
# Causal-mask buffers that older checkpoints saved; they hold no parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# (option, the value GPT-2 has, what GPT-2 has there, for a message)
OPTIONS = (("norm", "layernorm", "LayerNorm"),
           ("position", "learned", "learned positions"),
           ("mlp", "gelu", "a GELU MLP"),
           ("qk_norm", False, "no QK-norm"),
           ("bias", True, "biases everywhere"))
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both are the tanh GELU xpmodel computes
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
# GPT2Config's defaults, which Hugging Face applies to keys a config.json leaves out.
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
               "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
               "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
               "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "add_cross_attention": False, "tie_word_embeddings": True}


def mismatches(config):
    """[(option, value, what GPT2LMHeadModel has instead)] of `config`."""
    found = [(key, getattr(config, key), why) for key, value, why in OPTIONS
             if getattr(config, key) != value]
    if config.kv_heads != config.n_head:
        found.append(("n_kv_head", config.kv_heads, "no grouped-query attention"))
    return found


def tensor_table(config):
    """[(xpmodel name, [(HF name, width)], transposed)] as xpmodel.hf.convert reads it:
    here every tensor is its own, under "transformer." (the head at top level)."""
    return [(name, [(name if name == "lm_head.weight" else "transformer." + name, shape[-1])],
             False) for name, shape in parameter_shapes(config)]


def canonical(key):
    """The tensor_table name of a file's key: GPT-2 files may leave out "transformer."."""
    if key.startswith("transformer.") or key == "lm_head.weight":
        return key
    return "transformer." + key


def hf_config(config, special_ids):
    """The config.json document of a GPT2LMHeadModel equal to `config` (a
    GPTConfig), with `special_ids`' bos_token_id and eos_token_id."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None if config.mlp_width == 4 * config.n_embd else config.mlp_width,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def config_fields(hf_cfg, where):
    """GPTConfig's fields from a GPT-2 config.json document, refusing what xpmodel
    does not compute."""
    value = {key: hf_cfg.get(key, default) for key, default in HF_DEFAULTS.items()}
    try:
        rates = [check_number(key, value[key], HALF_OPEN_UNIT) for key in DROPOUT_KEYS]
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
    refusals = [
        (value["activation_function"] not in ACTIVATIONS,
         f"activation_function {quote(value['activation_function'], 100)} (xpmodel computes "
         f"the tanh GELU: {' or '.join(ACTIVATIONS)})"),
        (not value["scale_attn_weights"], "scale_attn_weights false"),
        (value["scale_attn_by_inverse_layer_idx"], "scale_attn_by_inverse_layer_idx"),
        (value["reorder_and_upcast_attn"], "reorder_and_upcast_attn"),
        (value["add_cross_attention"], "add_cross_attention"),
    ]
    for refused, feature in refusals:
        if refused:
            raise UsageError(f"{where}: {feature} is not supported")
    # One dropout rate for all three sites; when the file's differ, the largest.
    return dict(vocab_size=value["vocab_size"], block_size=value["n_positions"],
                n_layer=value["n_layer"], n_head=value["n_head"], n_embd=value["n_embd"],
                dropout=max(rates), mlp_hidden=value["n_inner"],
                norm_eps=value["layer_norm_epsilon"], tie_embeddings=value["tie_word_embeddings"])


# config.json's name for each GPTConfig field, for error messages.
HF_KEYS = {"block_size": "n_positions", "mlp_hidden": "n_inner",
           "norm_eps": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings"}
