"""The model's parameters as named views into one flat buffer.

One contiguous buffer lets zero-grad, the optimizer step, the gradient norm,
checkpoint I/O and the data-parallel all-reduce each be a single operation.
Names and shapes are those of Hugging Face's `GPT2LMHeadModel` without the
`transformer.` prefix; weights are (in, out). The architecture options add or
drop entries under the same naming scheme:

  position "rope"        no wpe.weight
  bias false             no biases (a LayerNorm keeps only its weight)
  norm "rmsnorm"         ln_*.weight only
  qk_norm                h.i.attn.q_norm.weight, h.i.attn.k_norm.weight (D,)
  n_kv_head H_kv         c_attn's columns are [q: H D | k: H_kv D | v: H_kv D]
  mlp "swiglu"           c_fc's columns are [gate: F | up: F]
  tie_embeddings false   lm_head.weight (V, C)

In the buffer, every matrix comes first and every vector (biases, norm
weights) after, so weight decay, which applies to matrices only, is one
slice: `flat[:n_decay]`.
"""


def parameter_shapes(config):
    """[(name, shape)] in GPT-2's order, for a GPTConfig."""
    V, T, C, F = config.vocab_size, config.block_size, config.n_embd, config.mlp_width
    D = config.head_size
    fc_width = 2 * F if config.mlp == "swiglu" else F

    def norm(name, width):
        with_bias = config.norm == "layernorm" and config.bias
        return [(name + ".weight", (width,))] + ([(name + ".bias", (width,))] if with_bias else [])

    def linear(name, n_in, n_out):
        return [(name + ".weight", (n_in, n_out))] + ([(name + ".bias", (n_out,))] if config.bias else [])

    shapes = [("wte.weight", (V, C))]
    if config.position == "learned":
        shapes.append(("wpe.weight", (T, C)))
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes += norm(p + "ln_1", C) + linear(p + "attn.c_attn", C, config.qkv_width)
        if config.qk_norm:
            shapes += [(p + "attn.q_norm.weight", (D,)), (p + "attn.k_norm.weight", (D,))]
        shapes += linear(p + "attn.c_proj", C, C) + norm(p + "ln_2", C)
        shapes += linear(p + "mlp.c_fc", C, fc_width) + linear(p + "mlp.c_proj", F, C)
    shapes += norm("ln_f", C)
    if not config.tie_embeddings:
        shapes.append(("lm_head.weight", (V, C)))
    return shapes


def part_sizes(config):
    """The parameter counts of the model's parts, worked out without listing
    them, so a config of any size is measured at once: "wte" (the token
    table), "lm_head" (0 when tied to wte), "positions" (0 with rotary ones),
    the blocks' "mlps", and "other" (attention and the norms). They add up to
    the parameters parameter_shapes(config) lists."""
    C, F, D = config.n_embd, config.mlp_width, config.head_size
    norm = C * (2 if config.norm == "layernorm" and config.bias else 1)

    def linear(n_in, n_out):
        return n_in * n_out + (n_out if config.bias else 0)
    fc_width = 2 * F if config.mlp == "swiglu" else F
    attention = linear(C, config.qkv_width) + (2 * D if config.qk_norm else 0) + linear(C, C)
    return {"wte": config.vocab_size * C,
            "lm_head": 0 if config.tie_embeddings else config.vocab_size * C,
            "positions": config.block_size * C if config.position == "learned" else 0,
            "mlps": config.n_layer * (linear(C, fc_width) + linear(F, C)),
            "other": config.n_layer * (2 * norm + attention) + norm}


def parameter_count(config):
    """The number of parameters parameter_shapes(config) lists (part_sizes' sum)."""
    return sum(part_sizes(config).values())


def is_norm_weight(name):
    """True for the weights of LayerNorm, RMSNorm and QK-norm (initialised to 1)."""
    return name.endswith(("ln_1.weight", "ln_2.weight", "q_norm.weight", "k_norm.weight")) \
        or name == "ln_f.weight"


class FlatLayout:
    """Where each named parameter lives in the flat buffer."""

    def __init__(self, shapes):
        self.shapes = dict(shapes)
        matrices = [n for n, s in shapes if len(s) >= 2]
        vectors = [n for n, s in shapes if len(s) < 2]
        self.names = [n for n, _ in shapes]   # GPT-2's order, for listing
        self.offsets = {}
        offset = 0
        for name in matrices + vectors:
            self.offsets[name] = offset
            offset += _numel(self.shapes[name])
            if name == matrices[-1]:
                self.n_decay = offset
        self.size = offset

    def views(self, flat):
        """name -> view of `flat` with the parameter's shape."""
        return {name: flat[self.offsets[name]:self.offsets[name] + _numel(self.shapes[name])]
                .reshape(self.shapes[name]) for name in self.names}


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
