"""Where a NaN or Inf first appears in a training step: the model's passes
re-run with the result of every layer function checked (Health.explain_nonfinite)."""
from contextlib import ExitStack, contextmanager


class NonFiniteFinder:
    """Wraps the functions the model's passes call (in xpmodel.model.gpt and
    xpmodel.layers.block) so that each result is checked; `found` is the
    first (where, "forward pass"/"backward pass") holding a NaN or Inf."""

    def __init__(self, model):
        self.model = model
        self.found = None
        self.block = None      # "h.i" of the block under way
        self.part = None       # its latest sublayer, naming the residual add that follows
        self.names = {id(view): name for name, view in model.grads.items()}

    def _check(self, arrays, where, what):
        if self.found is not None:
            return
        xp = self.model.xp
        for a in arrays:
            if a is not None and hasattr(a, "dtype") and not bool(xp.isfinite(a).all()):
                self.found = (where, what)
                return

    @contextmanager
    def installed(self):
        from ..layers import block as block_module
        from ..model import gpt as model_module
        F, B = "forward pass", "backward pass"
        check = self._check

        def first(out):
            return out[0] if isinstance(out, tuple) else out

        def enter_block(cfg, layer, *a, **k):
            self.block, self.part = f"h.{layer}", None

        hooks = [  # (module, function, check of its result and arguments, hook before the call)
            (model_module, "embedding_forward",
             lambda out, *a, **k: check([out], "the embeddings (wte/wpe)", F), None),
            (model_module, "block_forward",
             lambda out, cfg, layer, *a, **k: check([first(out)], f"h.{layer} (block output)", F),
             enter_block),
            (model_module, "norm_forward",
             lambda out, cfg, x, P, name, *a, **k: check([first(out)], name, F), None),
            (model_module, "lm_head_forward",
             lambda out, *a, **k: check([out], "the head (logits)", F), None),
            (model_module, "crossentropy_fused",
             lambda out, *a, **k: check(list(out), "the loss (cross-entropy)", F), None),
            (model_module, "lm_head_backward",
             lambda out, dlogits, hidden, W, dW, dx=None, **k:
             check([dW, dx], "the head (logits)", B), None),
            (model_module, "norm_backward",
             lambda out, cfg, dout, cache, P, G, name, **k:
             check([out, G[name + ".weight"]], name, B), None),
            (model_module, "block_backward",
             lambda out, cfg, layer, *a, **k: check([out], f"h.{layer}", B), enter_block),
            (model_module, "embedding_backward",
             lambda out, demb, idx, dwte, dwpe=None: check([dwte, dwpe], "the embeddings "
                                                                        "(wte/wpe)", B), None),
            # inside a block: its sublayers
            (block_module, "norm_forward",
             lambda out, cfg, x, P, name, *a, **k: self._sublayer(name, first(out), F), None),
            (block_module, "attention_forward",
             lambda out, *a, **k: self._sublayer(f"{self.block}.attn (attention)", first(out), F),
             None),
            (block_module, "mlp_hidden",
             lambda out, cfg, p, *a, **k: self._sublayer(f"{p}mlp.c_fc (and its activation)",
                                                         out[2], F), None),
            (block_module, "residual_forward",
             lambda out, *a, **k: check([out], f"{self.block}.{self.part or 'attn'}.c_proj "
                                               f"(and the residual add)", F), None),
            (block_module, "linear_backward",
             lambda out, dout, x, W, dW, db=None, **k:
             check([dW, db, out], self.names.get(id(dW), f"{self.block} (a projection)"), B), None),
            (block_module, "attention_backward",
             lambda out, *a, **k: check([out], f"{self.block}.attn (attention)", B), None),
            (block_module, "norm_backward",
             lambda out, cfg, dout, cache, P, G, name, **k:
             check([k.get("dx"), G[name + ".weight"]], name, B), None),
        ]
        with ExitStack() as stack:
            for module, name, after, before in hooks:
                stack.enter_context(_patched(module, name, _checked(getattr(module, name),
                                                                    after, before)))
            yield self

    def _sublayer(self, where, array, what):
        """A block's norm, attention or MLP ran: the residual add after it is that branch's."""
        if "mlp" in where:
            self.part = "mlp"
        elif "attn" in where:
            self.part = "attn"
        self._check([array], where, what)


def _checked(real, after, before=None):
    def checked(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        out = real(*args, **kwargs)
        after(out, *args, **kwargs)
        return out
    return checked


@contextmanager
def _patched(module, name, value):
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)
