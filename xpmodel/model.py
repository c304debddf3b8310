"""GPT-2 (pre-LayerNorm) assembled from the hand-written layers.

Dimension letters: B batch, T time, C n_embd, H n_head, V vocab, N = B*T.
The residual stream is kept as an (N, C) matrix so every projection is a
2-D matmul. Parameters and gradients are named views into two flat buffers
(see params.py); backward adds into the gradient views.
"""
import math
from typing import NamedTuple

import numpy

from .backend import get_device, get_dtype, random_generator, to_device, to_host, upcast
from .cpu_threads import keep_freed_memory, run_parallel, single_threaded_blas, split, thread_count
from .layers.attention import attention_backward, attention_forward
from .layers.crossentropy import IGNORE_INDEX, crossentropy_fused, lm_head_backward, lm_head_forward
from .layers.dropout import dropout_backward, dropout_forward, dropout_mask
from .layers.embedding import embedding_backward, embedding_forward
from .layers.gelu import gelu_backward, gelu_forward
from .layers.layernorm import layernorm_backward, layernorm_forward
from .layers.linear import linear_backward
from .layers.matmul import matmul
from .layers.residual import residual_forward
from .model_config import GPTConfig
from .params import FlatLayout, is_norm_weight, parameter_shapes

# Logits evaluated at once, as (rows, V) elements: ~16 MB in fp32 keeps a CPU
# chunk in cache; a GPU wants few, large launches (~512 MB of fp32 logits).
_LOGIT_ELEMENTS_PER_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 27}


class BlockCache(NamedTuple):
    """What one transformer block's backward reads from its forward."""
    ln1: object
    ln1_cache: object
    y: object
    attn_cache: object
    attn_mask: object
    ln2: object
    ln2_cache: object
    h: object
    gelu_cache: object
    g: object
    mlp_mask: object


class GPT:
    """A GPT-2 language model on one device.

    params / grads: name -> writable view into the flat buffers
    `flat_params` / `flat_grads` (float32 or, on CPU, float64).

    precision="fp16" is mixed precision: float32 master weights, a float16
    working copy of them (`flat_working`, `weights`) for the matmuls, float16
    activations around the matmuls, and the residual stream, LayerNorm,
    softmax and loss in float32.
    """

    def __init__(self, config, device="cpu", dtype="float32", seed=0, precision="fp32"):
        if not isinstance(config, GPTConfig):
            raise TypeError("GPT needs a GPTConfig")
        self.config = config
        self.device = get_device(device)
        self.dtype = get_dtype(dtype)
        if self.dtype == numpy.float16:
            raise ValueError("GPT parameters must be float32 or float64; "
                             "use train.precision=fp16 for mixed precision")
        self.device.activate()
        self.xp = self.device.xp
        self.layout = FlatLayout(parameter_shapes(config))
        self.flat_params = to_device(_init_parameters(config, self.layout, seed)
                                     .astype(self.dtype), self.device)
        self.flat_grads = self.xp.zeros_like(self.flat_params)
        self.params = self.layout.views(self.flat_params)
        self.grads = self.layout.views(self.flat_grads)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        if precision == "fp16" and self.dtype != numpy.float32:
            raise ValueError("fp16 mixed precision keeps float32 master weights: use dtype float32")
        self.precision = precision
        # Matmul weights: the masters themselves, or a float16 copy refreshed
        # from them (one whole-buffer cast) at the start of every pass.
        if precision == "fp16":
            self.flat_working = self.xp.empty(self.layout.size, dtype=numpy.float16)
            self.weights = self.layout.views(self.flat_working)
        else:
            self.flat_working = None
            self.weights = self.params
        self.compute_dtype = numpy.dtype(numpy.float16) if precision == "fp16" else self.dtype
        self.seed = seed
        self.dropout_calls = 0   # counts training passes; seeds each pass's dropout masks
        self.dropout_stream = 0  # set apart per data-parallel rank so ranks draw different masks
        self.training = True
        self._threads = thread_count()
        if not self.device.is_cuda:
            keep_freed_memory()
        self._grad_buffers = []  # (flat, views) gradient buffers for CPU threads 1..

    # ---- modes and bookkeeping -------------------------------------------------
    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def zero_grad(self):
        self.flat_grads.fill(0)

    def num_params(self):
        return self.layout.size

    # ---- forward / backward -----------------------------------------------------
    def forward(self, idx):
        """idx: (B, T) ints -> logits (B, T, V)."""
        idx = self.check_ids(idx, "idx")
        B, T = idx.shape
        self._refresh_working_copy()
        hidden, _ = self._forward_hidden(idx, rng=None)
        logits = lm_head_forward(hidden, self.weights["wte.weight"])
        return upcast(logits).reshape(B, T, self.config.vocab_size)

    def loss(self, idx, targets):
        """Mean cross-entropy over non-ignored targets, without gradients."""
        idx = self.check_ids(idx, "idx")
        targets = self._check_targets(targets, idx.shape)
        self._refresh_working_copy()
        totals = self._run_shards(idx.shape[0], lambda rows, k: self._shard_pass(idx[rows], targets[rows]))
        return sum(totals[1:], totals[0]) / self.xp.sum(targets != IGNORE_INDEX)

    def forward_backward(self, idx, targets, scale=1.0):
        """Forward, loss and backward for one batch; gradients are added.

        idx, targets: (B, T) ints (targets may hold -1 to ignore a position).
        scale multiplies the gradient (gradient accumulation, loss scaling);
        the returned loss is the unscaled mean cross-entropy: a NumPy scalar,
        or a 0-d CuPy array so that a GPU step need not wait for the device.
        """
        idx = self.check_ids(idx, "idx")
        targets = self._check_targets(targets, idx.shape)
        self._refresh_working_copy()
        count = self.xp.sum(targets != IGNORE_INDEX)
        dlosses = scale / count
        seed = self._dropout_seed() if self.training and self.config.dropout > 0 else None
        extra = self._shard_grad_buffers(self._n_shards(idx.shape[0]) - 1)
        grads = [self.grads] + [views for _, views in extra]

        def shard_pass(rows, k):
            rng = None if seed is None else random_generator(self.device, [seed, self.dropout_stream, k])
            return self._shard_pass(idx[rows], targets[rows], grads[k], dlosses, rng)

        totals = self._run_shards(idx.shape[0], shard_pass)
        for flat, _ in extra:
            self.flat_grads += flat
        return sum(totals[1:], totals[0]) / count

    def _run_shards(self, batch_size, shard_fn):
        """shard_fn(rows, k) for each shard k of the batch, one thread each on CPU."""
        shards = split(batch_size, self._n_shards(batch_size))
        if len(shards) == 1:
            return [shard_fn(shards[0], 0)]
        with single_threaded_blas():
            return run_parallel([lambda rows=rows, k=k: shard_fn(rows, k)
                                 for k, rows in enumerate(shards)])

    def _n_shards(self, batch_size):
        return 1 if self.device.is_cuda else min(batch_size, self._threads)

    def _shard_grad_buffers(self, count):
        """`count` zeroed (flat, views) gradient buffers for shards 1.. (shard 0
        adds into flat_grads); allocated once, reused every pass."""
        while len(self._grad_buffers) < count:
            flat = self.xp.zeros_like(self.flat_grads)
            self._grad_buffers.append((flat, self.layout.views(flat)))
        for flat, _ in self._grad_buffers[:count]:
            flat.fill(0)
        return self._grad_buffers[:count]

    def _shard_pass(self, idx, targets, G=None, dlosses=None, rng=None):
        """Forward of one shard, idx and targets (b, T), and with gradient views G
        its backward too, adding into G; returns the shard's summed cross-entropy."""
        W, xp = self.weights, self.xp
        hidden, caches = self._forward_hidden(idx, rng)
        targets = targets.reshape(-1)
        total = 0.0
        dhidden = None if G is None else xp.empty_like(hidden)
        for rows in self._logit_chunks(hidden.shape[0]):
            logits = lm_head_forward(hidden[rows], W["wte.weight"])
            losses, dlogits = crossentropy_fused(logits, targets[rows], dlosses)
            total = total + losses.sum()
            if G is not None:
                lm_head_backward(dlogits, hidden[rows], W["wte.weight"], G["wte.weight"],
                                 dx=dhidden[rows])
        if G is not None:
            self._backward_hidden(dhidden, idx, caches, G)
        return total

    def _refresh_working_copy(self):
        if self.flat_working is not None:
            self.flat_working[...] = self.flat_params

    def _forward_hidden(self, idx, rng):
        """idx (B, T) -> final LayerNorm output (N, C) in the compute dtype and
        the caches of every layer. The residual stream x stays in the master dtype."""
        P, W, cfg = self.params, self.weights, self.config
        low = self.compute_dtype
        B, T = idx.shape
        p_drop = cfg.dropout if rng is not None else 0.0
        x, emb_mask = dropout_forward(embedding_forward(idx, P["wte.weight"], P["wpe.weight"]),
                                      p_drop, rng)
        x = x.reshape(B * T, cfg.n_embd)
        block_caches = []
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            # Each projection's bias is added by the layer after it (the head
            # split, GELU, the residual add), which on CuPy saves a launch each;
            # the head merge and GELU backward sum their biases' gradients.
            ln1, ln1_cache = layernorm_forward(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], low)
            qkv = matmul(ln1, W[p + "attn.c_attn.weight"])
            y, attn_cache = attention_forward(qkv.reshape(B, T, 3 * cfg.n_embd), cfg.n_head,
                                              p_drop, rng, bias=W[p + "attn.c_attn.bias"])
            attn_branch = matmul(y, W[p + "attn.c_proj.weight"])
            attn_mask = dropout_mask(attn_branch, p_drop, rng)
            x = residual_forward(x, attn_branch, W[p + "attn.c_proj.bias"], attn_mask)

            ln2, ln2_cache = layernorm_forward(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], low)
            h = matmul(ln2, W[p + "mlp.c_fc.weight"])
            g, gelu_cache = gelu_forward(h, W[p + "mlp.c_fc.bias"])          # h += bias
            mlp_branch = matmul(g, W[p + "mlp.c_proj.weight"])
            mlp_mask = dropout_mask(mlp_branch, p_drop, rng)
            x = residual_forward(x, mlp_branch, W[p + "mlp.c_proj.bias"], mlp_mask)
            block_caches.append(BlockCache(ln1, ln1_cache, y, attn_cache, attn_mask,
                                           ln2, ln2_cache, h, gelu_cache, g, mlp_mask))
        hidden, lnf_cache = layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"], low)
        return hidden, (emb_mask, block_caches, lnf_cache)

    def _backward_hidden(self, dhidden, idx, caches, G):
        """dhidden: (N, C) gradient of the final LayerNorm output; adds into the views G."""
        P, W, cfg = self.params, self.weights, self.config
        B, T = idx.shape
        low = self.compute_dtype
        emb_mask, block_caches, lnf_cache = caches
        # The residual stream's gradient dx reaches every branch unchanged;
        # in mixed precision the branches read a float16 copy of it, which
        # each LayerNorm backward writes as it updates dx. A c_proj bias's
        # gradient is the column sum of what its branch receives: without
        # dropout on the branch, the LayerNorm backward before it sums it.
        dx_low = None if low == self.dtype else \
            self.xp.empty(dhidden.shape, dtype=low)

        def proj_bias(i, branch):
            """(where a LayerNorm backward sums block i's `branch` c_proj bias
            gradient, where linear_backward does): one of the two is None."""
            mask = getattr(block_caches[i], branch + "_mask")
            grad = G[f"h.{i}.{branch}.c_proj.bias"]
            return (grad, None) if mask is None else (None, grad)

        dx = layernorm_backward(dhidden, lnf_cache, P["ln_f.weight"], G["ln_f.weight"],
                                G["ln_f.bias"], dx_low=dx_low,
                                dx_sum=proj_bias(cfg.n_layer - 1, "mlp")[0])
        dbranch = dx if dx_low is None else dx_low
        for i in reversed(range(cfg.n_layer)):
            p = f"h.{i}."
            (ln1, ln1_cache, y, attn_cache, attn_mask,
             ln2, ln2_cache, h, gelu_cache, g, mlp_mask) = block_caches[i]
            dmlp_out = dropout_backward(dbranch, mlp_mask)
            dg = linear_backward(dmlp_out, g, W[p + "mlp.c_proj.weight"],
                                 G[p + "mlp.c_proj.weight"], proj_bias(i, "mlp")[1])
            dh = gelu_backward(dg, h, gelu_cache, dbias=G[p + "mlp.c_fc.bias"])
            dln2 = linear_backward(dh, ln2, W[p + "mlp.c_fc.weight"], G[p + "mlp.c_fc.weight"])
            layernorm_backward(dln2, ln2_cache, P[p + "ln_2.weight"], G[p + "ln_2.weight"],
                               G[p + "ln_2.bias"], dx=dx, dx_low=dx_low,
                               dx_sum=proj_bias(i, "attn")[0])

            dattn_out = dropout_backward(dbranch, attn_mask)
            dy = linear_backward(dattn_out, y, W[p + "attn.c_proj.weight"],
                                 G[p + "attn.c_proj.weight"], proj_bias(i, "attn")[1])
            dqkv = attention_backward(dy, attn_cache, dbias=G[p + "attn.c_attn.bias"])
            dln1 = linear_backward(dqkv, ln1, W[p + "attn.c_attn.weight"],
                                   G[p + "attn.c_attn.weight"])
            layernorm_backward(dln1, ln1_cache, P[p + "ln_1.weight"],
                               G[p + "ln_1.weight"], G[p + "ln_1.bias"], dx=dx,
                               dx_low=dx_low if i > 0 else None,
                               dx_sum=proj_bias(i - 1, "mlp")[0] if i > 0 else None)
        demb = dropout_backward(dx.reshape(B, T, cfg.n_embd), emb_mask)
        embedding_backward(demb, idx, G["wte.weight"], G["wpe.weight"])

    # ---- helpers ----------------------------------------------------------------
    def _logit_chunks(self, n_rows):
        step = max(1, _LOGIT_ELEMENTS_PER_CHUNK[self.device.kind] // self.config.vocab_size)
        return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]

    def _dropout_seed(self):
        """The dropout seed of this training pass, derived from (seed, pass count)
        so a resumed run draws the same masks as an uninterrupted one."""
        seed = int(numpy.random.SeedSequence([self.seed, self.dropout_calls]).generate_state(1)[0])
        self.dropout_calls += 1
        return seed

    def check_ids(self, idx, what):
        shape = getattr(idx, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"{what} must be a (B, T) integer array, got shape {shape}")
        if shape[1] > self.config.block_size:
            raise ValueError(f"{what}: sequence length {shape[1]} exceeds block_size "
                             f"{self.config.block_size}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{what}: empty batch of shape {shape}")
        if not numpy.issubdtype(idx.dtype, numpy.integer):
            raise ValueError(f"{what} must hold integers, got {idx.dtype}")
        low, high = int(idx.min()), int(idx.max())   # one small sync for a device array
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"{what}: token ids must be in [0, {self.config.vocab_size}), "
                             f"got range [{low}, {high}]")
        return to_device(idx.astype(numpy.int64, copy=False), self.device)

    def _check_targets(self, targets, shape):
        if getattr(targets, "shape", None) != shape:
            raise ValueError(f"targets must have the shape of idx {shape}, "
                             f"got {getattr(targets, 'shape', None)}")
        low, high = int(targets.min()), int(targets.max())
        if low < IGNORE_INDEX or high >= self.config.vocab_size:
            raise ValueError(f"targets: ids must be in [0, {self.config.vocab_size}) "
                             f"or {IGNORE_INDEX}, got range [{low}, {high}]")
        return to_device(targets.astype(numpy.int64, copy=False), self.device)

    def state_arrays(self):
        """name -> host (NumPy) copy of every parameter."""
        return {name: to_host(view) for name, view in self.params.items()}

    def load_state_arrays(self, arrays):
        """Copy named arrays (host or device) into the parameters, checking shapes."""
        missing = [n for n in self.layout.names if n not in arrays]
        unexpected = [n for n in arrays if n not in self.layout.shapes]
        if missing or unexpected:
            raise ValueError(f"parameter names do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, view in self.params.items():
            value = arrays[name]
            if tuple(value.shape) != tuple(view.shape):
                raise ValueError(f"parameter {name}: shape {tuple(value.shape)} does not "
                                 f"match the model's {tuple(view.shape)}")
            view[...] = to_device(numpy.asarray(to_host(value), dtype=self.dtype), self.device)


def _init_parameters(config, layout, seed):
    """GPT-2 initialisation on the host in float64: N(0, 0.02) matrices,
    N(0, 0.02/sqrt(2 L)) residual projections, zero biases, unit LayerNorm.
    Drawing on the host gives the same weights on every device and dtype."""
    rng = numpy.random.default_rng(seed)
    flat = numpy.zeros(layout.size, dtype=numpy.float64)
    views = layout.views(flat)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name in layout.names:
        view = views[name]
        if is_norm_weight(name):
            view.fill(1.0)
        elif view.ndim == 2:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            view[...] = rng.normal(0.0, std, size=view.shape)
    return flat
