"""The network's shape and architecture options: `GPTConfig`, and the one
function that builds it from a run config.

The defaults are GPT-2: LayerNorm, learned positions, a GELU MLP of 4·C,
biases everywhere and the output head tied to the token embedding. The
options turn it into the blocks of current small models (Llama, Qwen, OLMo,
the modded-nanogpt speedrun): RMSNorm, rotary positions, QK-norm, SwiGLU or
squared-ReLU MLPs, grouped-query attention, no biases, an untied head.
"""
import math
from dataclasses import dataclass, fields

from ..checks import (HALF_OPEN_UNIT, POSITIVE, POSITIVE_FRACTION, ROPE_THETAS, check_integer,
                      check_number)
from ..options import MLPS, NORMS, POSITIONS

SWIGLU_MULTIPLE = 64    # SwiGLU's default hidden width is rounded up to a multiple of this


def default_mlp_hidden(mlp, n_embd):
    """4·C for gelu and relu2; for swiglu Llama's 2/3 of that (two input
    matrices keep the parameter count of one 4·C MLP), truncated to an
    integer and rounded up to a multiple of SWIGLU_MULTIPLE (Meta's Llama
    code rounds to 256: C = 256 gives 704 here, 768 there)."""
    if mlp != "swiglu":
        return 4 * n_embd
    return SWIGLU_MULTIPLE * math.ceil(int(8 * n_embd / 3) / SWIGLU_MULTIPLE)


@dataclass(frozen=True)
class GPTConfig:
    """vocab_size V, block_size T, n_layer L, n_head H, n_embd C, and the
    architecture options.

    n_kv_head and mlp_hidden keep what they were given; None means the
    default, which `kv_heads` (n_head) and `mlp_width` (by `mlp` and n_embd)
    resolve when read, so `dataclasses.replace(config, n_head=8)` keeps
    following it. Two configs are equal when they describe the same network:
    a default equals the value it resolves to, and an option the architecture
    does not read (`unused_options`) is not compared."""
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    qk_norm: bool = False
    mlp: str = "gelu"
    mlp_hidden: int = None
    n_kv_head: int = None
    bias: bool = True
    tie_embeddings: bool = True

    def __post_init__(self):
        for name, choices in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, str(getattr(self, name)))   # a NumPy string as str
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        given = [name for name in ("n_kv_head", "mlp_hidden") if getattr(self, name) is not None]
        # numbers are stored as Python ints and floats, so a config given NumPy scalars serialises
        for name in (*sizes, *given):
            object.__setattr__(self, name, check_integer(f"GPTConfig.{name}", getattr(self, name), POSITIVE))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by "
                             f"n_head ({self.n_head})")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be divisible by "
                             f"n_kv_head ({self.kv_heads})")
        for name, within in (("dropout", HALF_OPEN_UNIT), ("norm_eps", POSITIVE_FRACTION),
                             ("rope_theta", ROPE_THETAS)):
            object.__setattr__(self, name, check_number(f"GPTConfig.{name}", getattr(self, name), within))
        for name in ("qk_norm", "bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"GPTConfig: rotary positions need an even head size, got "
                             f"n_embd / n_head = {self.head_size}")

    def __eq__(self, other):
        if not isinstance(other, GPTConfig):
            return NotImplemented
        return self._network() == other._network()

    def __hash__(self):
        return hash(self._network())

    def _network(self):
        """Every field, with n_kv_head and mlp_hidden resolved and the unused
        options (`unused_options`) as None."""
        resolved = {"n_kv_head": self.kv_heads, "mlp_hidden": self.mlp_width,
                    **dict.fromkeys(unused_options(self))}
        return tuple(resolved.get(f.name, getattr(self, f.name)) for f in fields(self))

    @property
    def kv_heads(self):
        """H_kv, the key/value heads: n_kv_head, or n_head when that is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self):
        """F, the MLP's hidden width: mlp_hidden, or `default_mlp_hidden` when that is None."""
        return default_mlp_hidden(self.mlp, self.n_embd) if self.mlp_hidden is None \
            else self.mlp_hidden

    @property
    def head_size(self):
        """D, the width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def qkv_width(self):
        """Columns of the fused q, k, v projection: (H + 2 H_kv) D."""
        return (self.n_head + 2 * self.kv_heads) * self.head_size

    def num_params(self, include_embeddings=True):
        """Parameters; include_embeddings=False leaves out the lookup tables, as
        the 6N FLOPs rule does: the position table, and the token table when
        the head is untied (a tied one is the head's matrix too, and counts)."""
        from .params import part_sizes
        parts = part_sizes(self)
        total = sum(parts.values())
        if include_embeddings:
            return total
        return total - parts["positions"] - (0 if self.tie_embeddings else parts["wte"])

    def flops_per_token(self):
        """Training FLOPs per token: 6N + 12 L C T (N without lookup tables, T block_size)."""
        return (6 * self.num_params(include_embeddings=False)
                + 12 * self.n_layer * self.n_embd * self.block_size)


def unused_options(config):
    """The architecture options that `config` (a GPTConfig, or a run config's
    ModelConfig: the names are the same) holds but its network never reads:
    rope_theta without rotary positions. Every other option is read by every
    choice of the others (norm_eps by either norm, QK-norm's included)."""
    return () if config.position == "rope" else ("rope_theta",)


# The ModelConfig keys that are architecture options, passed through unchanged.
OPTION_KEYS = ("norm", "norm_eps", "position", "rope_theta", "qk_norm", "mlp", "mlp_hidden",
               "n_kv_head", "bias", "tie_embeddings")


def gpt_config(model, vocab_size):
    """The GPTConfig of a run config's `model` section (a ModelConfig) for a
    tokenizer of vocab_size ids (model.vocab_size pads it)."""
    vocab = model.vocab_size or vocab_size
    return GPTConfig(vocab_size=vocab, block_size=model.block_size, n_layer=model.n_layer,
                     n_head=model.n_head, n_embd=model.n_embd, dropout=model.dropout,
                     **{key: getattr(model, key) for key in OPTION_KEYS})
