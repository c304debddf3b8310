"""GPT-2's parameters as named views into one flat buffer.

One contiguous buffer lets zero-grad, the optimizer step, the gradient norm,
checkpoint I/O and the data-parallel all-reduce each be a single operation.
Names and shapes are those of Hugging Face's `GPT2LMHeadModel` without the
`transformer.` prefix; weights are (in, out). In the buffer, every matrix
comes first and every vector (biases, LayerNorm) after, so weight decay, which
applies to matrices only, is one slice: `flat[:n_decay]`.
"""


def parameter_shapes(config):
    """[(name, shape)] in GPT-2's order."""
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = [("wte.weight", (V, C)), ("wpe.weight", (T, C))]
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (C, 3 * C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


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
