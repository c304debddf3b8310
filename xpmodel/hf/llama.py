"""Hugging Face Llama (`LlamaForCausalLM`) as one family of xpmodel.hf.convert.

A Llama block is xpmodel's block with norm rmsnorm, position rope, mlp
swiglu and no QK-norm; n_kv_head, the MLP width, norm_eps, rope_theta, bias
(attention_bias and mlp_bias together) and a tied or untied head carry over.
Dropout does not: Llama's attention_dropout drops attention probabilities
only, xpmodel's dropout embeddings and residual branches too, so an export
writes attention_dropout 0.0 and an import leaves it out (dropout 0).
Hugging Face stores each projection separately as (out, in); xpmodel fuses
them and stores (in, out):

  h.i.attn.c_attn.weight (C, (H + 2 H_kv) D) = [q_proj.T | k_proj.T | v_proj.T]
  h.i.attn.c_proj.weight (C, C)              = o_proj.T
  h.i.mlp.c_fc.weight    (C, 2 F)            = [gate_proj.T | up_proj.T]
  h.i.mlp.c_proj.weight  (F, C)              = down_proj.T
  h.i.ln_1 / ln_2 / ln_f                     = input_layernorm / post_attention_layernorm / norm
  wte.weight, lm_head.weight (V, C)          = embed_tokens.weight, lm_head.weight

Both number q's heads the same way (head h is columns h D .. (h+1) D) and
rotate each head by halves (Hugging Face's rotate_half), so no column moves.
"""
from ..errors import DataError, UsageError, quote, setting_text

ARCHITECTURE = "LlamaForCausalLM"
ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPE = "llama"
EMBEDDING = "model.embed_tokens.weight"
# The start of every name of layer i's tensors, with i for {}.
LAYER_PREFIX = "model.layers.{}."
# Rotary tables that older checkpoints saved; they hold no parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# (option, the value Llama has, what Llama has there, for a message)
OPTIONS = (("norm", "rmsnorm", "RMSNorm"),
           ("position", "rope", "rotary positions"),
           ("mlp", "swiglu", "a SwiGLU MLP"),
           ("qk_norm", False, "no QK-norm"))
ACTIVATIONS = ("silu", "swish")   # two names of x * sigmoid(x)
# Rotary positions beyond this are refused: xpmodel builds tables of block_size rows.
MAX_POSITIONS = 1 << 20
# LlamaConfig's defaults, which Hugging Face applies to keys a config.json leaves out.
HF_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
               "head_dim": None, "hidden_act": "silu", "max_position_embeddings": 2048,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
               "mlp_bias": False, "pretraining_tp": 1,
               "tie_word_embeddings": False}
# config.json's name for each GPTConfig field, for error messages.
HF_KEYS = {"vocab_size": "vocab_size", "block_size": "max_position_embeddings",
           "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
           "n_embd": "hidden_size", "n_kv_head": "num_key_value_heads",
           "mlp_hidden": "intermediate_size", "norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings"}


def mismatches(config):
    """[(option, value, what LlamaForCausalLM has instead)] of `config`."""
    return [(key, getattr(config, key), why) for key, value, why in OPTIONS
            if getattr(config, key) != value]


def tensor_table(config):
    """[(xpmodel name, [(HF name, width)], transposed)]: each xpmodel tensor is
    its Hugging Face tensors side by side along its last axis, each
    transposed from (out, in) first when `transposed`."""
    C, D, F = config.n_embd, config.head_size, config.mlp_width
    q, kv = config.n_head * D, config.kv_heads * D
    table = [("wte.weight", [(EMBEDDING, C)], False)]
    for i in range(config.n_layer):
        h, m = f"h.{i}.", f"model.layers.{i}."
        table += [(h + "ln_1.weight", [(m + "input_layernorm.weight", C)], False),
                  (h + "ln_2.weight", [(m + "post_attention_layernorm.weight", C)], False)]
        linears = [("attn.c_attn", [("self_attn.q_proj", q), ("self_attn.k_proj", kv),
                                    ("self_attn.v_proj", kv)]),
                   ("attn.c_proj", [("self_attn.o_proj", C)]),
                   ("mlp.c_fc", [("mlp.gate_proj", F), ("mlp.up_proj", F)]),
                   ("mlp.c_proj", [("mlp.down_proj", C)])]
        for ours, theirs in linears:
            table.append((h + ours + ".weight", [(m + t + ".weight", w) for t, w in theirs], True))
            if config.bias:
                table.append((h + ours + ".bias", [(m + t + ".bias", w) for t, w in theirs],
                              False))
    table.append(("ln_f.weight", [("model.norm.weight", C)], False))
    if not config.tie_embeddings:
        table.append(("lm_head.weight", [("lm_head.weight", C)], False))
    return table


def canonical(key):
    return key


def hf_config(config, special_ids):
    """The config.json document of a LlamaForCausalLM equal to `config` (a
    GPTConfig), with `special_ids`' bos_token_id and eos_token_id. rope_theta
    is written both where transformers 4 reads it and inside rope_parameters,
    where transformers 5 keeps it."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "pad_token_id": None,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def config_fields(hf_cfg, where):
    """GPTConfig's fields from a Llama config.json document, refusing what
    xpmodel does not compute."""
    value = {key: hf_cfg.get(key, default) for key, default in HF_DEFAULTS.items()}
    theta = _rope_theta(hf_cfg, where)
    for key in ("attention_bias", "mlp_bias"):
        if not isinstance(value[key], bool):
            raise DataError(f"{where}: {key} must be true or false, got {quote(value[key], 100)}")
    heads, hidden = value["num_attention_heads"], value["hidden_size"]
    positions = value["max_position_embeddings"]
    refusals = [
        (value["hidden_act"] not in ACTIVATIONS,
         f"hidden_act {quote(value['hidden_act'], 100)} (xpmodel's SwiGLU gates with silu)"),
        (value["attention_bias"] != value["mlp_bias"],
         f"attention_bias {setting_text(value['attention_bias'])} with mlp_bias "
         f"{setting_text(value['mlp_bias'])} (xpmodel's bias option covers both)"),
        (value["pretraining_tp"] not in (None, 1),
         f"pretraining_tp {quote(value['pretraining_tp'], 100)}"),
        (value["head_dim"] is not None
         and _head_size(hidden, heads) not in (None, value["head_dim"]),
         f"head_dim {quote(value['head_dim'], 100)} (xpmodel's head size is hidden_size / "
         f"num_attention_heads)"),
        (_is_int(positions) and positions > MAX_POSITIONS,
         f"max_position_embeddings {positions} (more than xpmodel's {MAX_POSITIONS})"),
    ]
    for refused, feature in refusals:
        if refused:
            raise UsageError(f"{where}: {feature} is not supported")
    return dict(vocab_size=value["vocab_size"], block_size=positions,
                n_layer=value["num_hidden_layers"], n_head=heads, n_embd=hidden,
                n_kv_head=value["num_key_value_heads"], mlp_hidden=value["intermediate_size"],
                norm="rmsnorm", norm_eps=value["rms_norm_eps"], position="rope",
                rope_theta=theta, mlp="swiglu", bias=value["attention_bias"],
                tie_embeddings=value["tie_word_embeddings"])


def _rope_theta(hf_cfg, where):
    """The base of plain RoPE, from rope_theta (transformers 4), rope_parameters
    (transformers 5) or rope_scaling; any scaling or partial rotation is refused,
    and so are thetas in two of those places that disagree (transformers 4 and
    5 would each take another)."""
    thetas = {}   # where config.json gives a theta -> the theta
    if "rope_theta" in hf_cfg:
        thetas["rope_theta"] = hf_cfg["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf_cfg.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise DataError(f"{where}: {key} must be an object or null, got {quote(rope, 100)}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        others = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or others:
            what = f"rope_type {quote(kind, 100)}" if kind != "default" else quote(others[0], 100)
            raise UsageError(f"{where}: {key} with {what} is not supported (xpmodel computes "
                             f"plain RoPE)")
        if "rope_theta" in rope:
            thetas[f"{key}.rope_theta"] = rope["rope_theta"]
    values = list(thetas.values())
    if any(theta != values[0] for theta in values[1:]):
        given = " and ".join(f"{name} {quote(theta, 100)}" for name, theta in thetas.items())
        raise DataError(f"{where}: {given} disagree (transformers 4 and 5 would use "
                        f"different ones); keep one rope_theta")
    partial = hf_cfg.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise UsageError(f"{where}: partial_rotary_factor {quote(partial, 100)} is not supported "
                         f"(xpmodel rotates whole heads)")
    return values[0] if values else HF_DEFAULTS["rope_theta"]


def _head_size(hidden, heads):
    """hidden_size / num_attention_heads, or None when they are not positive
    integers that divide (GPTConfig then names the culprit)."""
    sizes_valid = all(_is_int(size) and size > 0 for size in (hidden, heads))
    return hidden // heads if sizes_valid and hidden % heads == 0 else None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)
