"""The language model: embeddings -> blocks -> head, from the hand-written layers.

GPT-2 by default; the options of config.py choose the block's parts
(layers/block.py). Dimension letters as in layers/__init__.py: B batch,
T time, C n_embd, V vocab, N = B*T.
The residual stream is kept as an (N, C) matrix so every projection is a
2-D matmul. Parameters and gradients are named views into two flat buffers
(see params.py); backward adds into the gradient views.
"""
import functools
import math
from collections.abc import Mapping
from contextlib import contextmanager

import numpy

from ..backend import (BFLOAT16, bfloat16_problem, check_kernels, check_real_values, check_scale,
                       get_device, get_dtype, is_half, to_device, to_host, upcast, use_kernels)
from ..checks import NON_NEGATIVE, check_integer, check_number
from ..cpu_threads import keep_freed_memory, run_parallel, single_threaded_blas, split, thread_count
from ..layers.block import block_backward, block_forward, norm_backward, norm_forward, proj_bias_sums
from ..layers.crossentropy import IGNORE_INDEX, crossentropy_fused, lm_head_backward, lm_head_forward
from ..layers.dropout import dropout_backward, dropout_forward, pass_generator
from ..layers.embedding import embedding_backward, embedding_forward
from ..layers.embedding_noise import NOISE_KINDS, embedding_noise_backward, embedding_noise_forward
from ..layers.rope import rope_tables
from .config import GPTConfig
from .params import FlatLayout, is_norm_weight, parameter_shapes

RECOMPUTE = ("none", "mlp", "block")
# The working copy's and activations' dtype of each precision (fp32: the masters')
_WORKING_DTYPES = {"fp32": None, "fp16": numpy.dtype(numpy.float16), "bf16": BFLOAT16}

# Logits evaluated at once, as (rows, V) elements: ~16 MB in fp32 keeps a CPU
# chunk in cache; a GPU wants few, large launches (~512 MB of fp32 logits).
_LOGIT_ELEMENTS_PER_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 27}


def with_kernels(function):
    """`function(model, ...)` with the layers running model.kernels (backend.use_kernels)."""
    @functools.wraps(function)
    def run(model, *args, **kwargs):
        with use_kernels(model.kernels):
            return function(model, *args, **kwargs)
    return run


class GPT:
    """A GPT language model on one device (GPT-2, or the architecture its config chooses).

    params / grads: name -> writable view into the flat buffers
    `flat_params` / `flat_grads` (float32 or, on CPU, float64).

    precision="fp16" is mixed precision: float32 master weights, a float16
    working copy of them (`flat_working`, `weights`) for the matmuls, float16
    activations around the matmuls, and the residual stream, the norms,
    softmax and loss in float32. precision="bf16" is the same with bfloat16
    (float32's exponent range, so the trainer scales no loss).

    kernels: on CUDA, "fused" runs the kernels of xpmodel/cuda; "xp" runs
    every layer's own `xp` expressions on CuPy, the code NumPy runs (cuBLAS
    only for the matrix products). Its passes (and generation's) and AdamW
    follow it; it may be changed between passes. On CPU both are the `xp` code.

    recompute trades compute for activation memory: "mlp" keeps no MLP hidden
    activations (the two (N, F) arrays per block) and recomputes them in
    backward; "block" keeps only each block's input and recomputes the whole
    block (about one more forward pass). Gradients are the same bit for bit;
    with dropout, "block" draws each block's masks from its own seed, so the
    masks differ from the other modes' (not their distribution).
    """

    def __init__(self, config, device="cpu", dtype="float32", seed=0, precision="fp32",
                 kernels="fused", recompute="none"):
        if not isinstance(config, GPTConfig):
            raise TypeError("GPT needs a GPTConfig")
        seed = check_integer("seed", seed)
        self.config = config
        self.device = get_device(device)
        self.dtype = get_dtype(dtype)
        if is_half(self.dtype):
            raise ValueError(f"dtype {self.dtype.name}: GPT parameters are float32 or float64; "
                             f"{self.dtype.name} trains as mixed precision over float32 weights: "
                             f"precision='{'bf16' if self.dtype == BFLOAT16 else 'fp16'}' "
                             f"(train.precision in a config)")
        if precision not in _WORKING_DTYPES:
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision != "fp32" and self.dtype != numpy.float32:
            raise ValueError(f"{precision} mixed precision keeps float32 master weights: use dtype float32")
        problem = bfloat16_problem(self.device) if precision == "bf16" else None
        if problem:
            raise ValueError(f"train.precision=bf16: {problem}")
        self.device.activate()
        self.xp = self.device.xp
        self.layout = FlatLayout(parameter_shapes(config))
        self.flat_params = to_device(_init_parameters(config, self.layout, seed)
                                     .astype(self.dtype), self.device)
        self.flat_grads = self.xp.zeros_like(self.flat_params)
        self.params = self.layout.views(self.flat_params)
        self.grads = self.layout.views(self.flat_grads)
        self.precision = precision
        self.kernels = kernels
        self.recompute = recompute
        # Matmul weights: the masters themselves, or a 16-bit copy refreshed
        # from them (one whole-buffer cast) at the start of every pass.
        working = _WORKING_DTYPES[precision]
        if working is not None:
            self.flat_working = self.xp.empty(self.layout.size, dtype=working)
            self.weights = self.layout.views(self.flat_working)
        else:
            self.flat_working = None
            self.weights = self.params
        self.compute_dtype = working if working is not None else self.dtype
        self.seed = seed
        self.dropout_calls = 0   # counts training passes; seeds each pass's dropout masks
        self.dropout_stream = 0  # set apart per data-parallel rank so ranks draw different masks
        self.embedding_noise = (0.0, "uniform")  # (alpha, kind): NEFTune noise in training passes
        self.training = True
        self._threads = thread_count()
        self._shards_in_turn = False   # shards_in_turn(): the shards one after another
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

    @contextmanager
    def evaluating(self):
        """The model in eval mode inside the block, its previous mode restored after."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.training = was_training

    @property
    def embedding_noise(self):
        """(alpha, kind): NEFTune noise on the embeddings of training passes
        (layers/embedding_noise.py); alpha 0 adds none."""
        return self._embedding_noise

    @embedding_noise.setter
    def embedding_noise(self, value):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"embedding_noise must be a pair (alpha, kind), got {value!r}")
        alpha = check_number("embedding_noise alpha", value[0], NON_NEGATIVE)
        if value[1] not in NOISE_KINDS:
            raise ValueError(f"embedding_noise kind must be one of {', '.join(NOISE_KINDS)}, "
                             f"got {value[1]!r}")
        self._embedding_noise = (alpha, value[1])

    def zero_grad(self):
        self.flat_grads.fill(0)

    @property
    def kernels(self):
        """"fused" or "xp" (see the class docstring); checked when set."""
        return self._kernels

    @kernels.setter
    def kernels(self, mode):
        self._kernels = check_kernels(mode)

    @property
    def recompute(self):
        """"none", "mlp" or "block" (see the class docstring); checked when set."""
        return self._recompute

    @recompute.setter
    def recompute(self, mode):
        if not isinstance(mode, str) or mode not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {mode!r}")
        self._recompute = mode

    def num_params(self):
        return self.layout.size

    # ---- forward / backward -----------------------------------------------------
    @with_kernels
    def forward(self, idx):
        """idx: (B, T) ints -> logits (B, T, V)."""
        idx = self.check_ids(idx, "idx")
        B, T = idx.shape
        self._refresh_working_copy()
        hidden, _ = self._forward_hidden(idx, rng=None)
        return self._logits(hidden).reshape(B, T, self.config.vocab_size)

    @with_kernels
    def forward_cached(self, idx, kv_cache):
        """idx: (B, T) checked ids at positions kv_cache.length .. +T-1 ->
        logits (B, V) of the last one. Each block's attention appends these
        positions' keys and values to kv_cache (generate.KVCache) and attends
        over all it holds; advancing kv_cache.length is the caller's. The
        weights and dtypes are forward's, so the logits match its to rounding."""
        B, T = idx.shape
        self._refresh_working_copy()
        hidden, _ = self._forward_hidden(idx, rng=None, kv_cache=kv_cache)
        return self._logits(hidden.reshape(B, T, self.config.n_embd)[:, -1])

    def _logits(self, hidden):
        """hidden: (N, C) final norm output -> logits (N, V) in at least float32."""
        return upcast(lm_head_forward(hidden, self.weights[self.head_weight_name]))

    @with_kernels
    def loss(self, idx, targets):
        """Mean cross-entropy over non-ignored targets, without gradients."""
        idx = self.check_ids(idx, "idx")
        targets = self._check_targets(targets, idx.shape)
        self._refresh_working_copy()
        totals = self._run_shards(idx.shape[0], lambda rows, k: self._shard_pass(idx[rows], targets[rows]))
        return sum(totals[1:], totals[0]) / self._target_count(targets)

    @with_kernels
    def forward_backward(self, idx, targets, scale=1.0):
        """Forward, loss and backward for one batch; gradients are added.

        idx, targets: (B, T) ints (targets may hold -1 to ignore a position).
        scale multiplies the gradient (gradient accumulation, loss scaling): a
        finite positive number, or a 0-d float array on the GPU (the trainer's
        loss scale, left unread so that the step need not wait for it);
        the returned loss is the unscaled mean cross-entropy (0 when every
        target is ignored, with zero gradients): a NumPy scalar,
        or a 0-d CuPy array so that a GPU step need not wait for the device.
        """
        scale = check_scale(scale)
        idx = self.check_ids(idx, "idx")
        targets = self._check_targets(targets, idx.shape)
        self._refresh_working_copy()
        count = self._target_count(targets)
        dlosses = scale / count
        noisy = self.config.dropout > 0 or self.embedding_noise[0] > 0
        seed = self._dropout_seed() if self.training and noisy else None
        extra = self._shard_grad_buffers(self.shard_count(idx.shape[0]) - 1)
        grads = [self.grads] + [views for _, views in extra]

        def shard_pass(rows, k):
            key = None if seed is None else [seed, self.dropout_stream, k]
            rng = None if key is None else pass_generator(self.device, key)
            return self._shard_pass(idx[rows], targets[rows], grads[k], dlosses, rng, key)

        totals = self._run_shards(idx.shape[0], shard_pass)
        for flat, _ in extra:
            self.flat_grads += flat
        return sum(totals[1:], totals[0]) / count

    def _target_count(self, targets):
        """Positions that count toward the mean, at least 1: a batch whose every
        target is ignored then has loss 0 and zero gradients, not NaN."""
        return self.xp.maximum(self.xp.sum(targets != IGNORE_INDEX), 1)

    def _run_shards(self, batch_size, shard_fn):
        """shard_fn(rows, k) for each shard k of the batch, one thread each on CPU."""
        shards = split(batch_size, self.shard_count(batch_size))
        if len(shards) == 1 or self._shards_in_turn:
            return [shard_fn(rows, k) for k, rows in enumerate(shards)]
        with single_threaded_blas():
            return run_parallel([lambda rows=rows, k=k: shard_fn(rows, k)
                                 for k, rows in enumerate(shards)])

    @contextmanager
    def shards_in_turn(self):
        """Within: the batch splits into the same shards, with the same dropout
        masks and noise, but they run one after another on the calling thread,
        so that a check wrapped around the layers sees one shard's pass at a time."""
        saved, self._shards_in_turn = self._shards_in_turn, True
        try:
            yield
        finally:
            self._shards_in_turn = saved

    def shard_count(self, batch_size):
        """How many shards a batch is split into: one per CPU thread (see
        cpu_threads.py), one on a GPU. Float sums follow the split, so a run
        repeats itself bit for bit only with the same count."""
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

    def _shard_pass(self, idx, targets, G=None, dlosses=None, rng=None, rng_key=None):
        """Forward of one shard, idx and targets (b, T), and with gradient views G
        its backward too, adding into G; returns the shard's summed cross-entropy.
        rng: the pass's generator, seeded by rng_key (a list of ints)."""
        W, xp = self.weights, self.xp
        hidden, caches = self._forward_hidden(idx, rng, rng_key)        # (N, C)
        targets = targets.reshape(-1)                                   # (N,)
        total = 0.0
        dhidden = None if G is None else xp.empty_like(hidden)          # (N, C)
        head = self.head_weight_name
        for rows in self._logit_chunks(hidden.shape[0]):
            logits = lm_head_forward(hidden[rows], W[head])             # (rows, V)
            losses, dlogits = crossentropy_fused(logits, targets[rows], dlosses)
            total = total + losses.sum()
            if G is not None:
                lm_head_backward(dlogits, hidden[rows], W[head], G[head], dx=dhidden[rows])
        if G is not None:
            self._backward_hidden(dhidden, idx, caches, G)
        return total

    def _refresh_working_copy(self):
        if self.flat_working is not None:
            self.flat_working[...] = self.flat_params

    def _forward_hidden(self, idx, rng, rng_key=None, kv_cache=None):
        """idx (B, T) -> final norm output (N, C) in the compute dtype and the
        caches of every layer. The residual stream x stays in the master dtype.
        With kv_cache (generation), idx continues the positions it holds."""
        P, W, cfg = self.params, self.weights, self.config
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        p_drop = cfg.dropout if rng is not None else 0.0
        wpe = P.get("wpe.weight")
        x = embedding_forward(idx, P["wte.weight"], None if wpe is None else wpe[start:start + T])
        x, _ = embedding_noise_forward(x, *self.embedding_noise, rng)
        x, emb_mask = dropout_forward(x, p_drop, rng)
        x = x.reshape(B * T, cfg.n_embd)
        rope = self.rope_tables(start, T)
        block_caches = []
        for i in range(cfg.n_layer):
            if kv_cache is not None:
                x, cache = block_forward(cfg, i, x, (B, T), P, W, self.compute_dtype, rope=rope,
                                         kv_cache=kv_cache.layer(i), keep_mlp=False)
                block_caches.append(cache)
            elif self.recompute == "block":   # keep the input; the block runs again in backward
                block_seed = None if p_drop == 0 else [*rng_key, i]   # no device read
                block_caches.append((x.copy(), block_seed))
                x, _ = self._block_forward(i, x, (B, T), p_drop, block_seed, rope)
            else:
                x, cache = block_forward(cfg, i, x, (B, T), P, W, self.compute_dtype, p_drop, rng,
                                         rope, keep_mlp=self.recompute == "none")
                block_caches.append(cache)
        hidden, lnf_cache = norm_forward(cfg, x, P, "ln_f", self.compute_dtype)
        return hidden, (emb_mask, block_caches, lnf_cache, p_drop, rope)

    def _block_forward(self, i, x, shape, p_drop, block_seed, rope):
        """Block i with its own dropout generator (recompute "block"), forward and again in backward."""
        rng = None if block_seed is None else pass_generator(self.device, block_seed)
        return block_forward(self.config, i, x, shape, self.params, self.weights,
                             self.compute_dtype, p_drop, rng, rope)

    def _backward_hidden(self, dhidden, idx, caches, G):
        """dhidden: (N, C) gradient of the final norm output; adds into the views G."""
        P, W, cfg = self.params, self.weights, self.config
        B, T = idx.shape
        emb_mask, block_caches, lnf_cache, p_drop, rope = caches
        # The residual stream's gradient dx reaches every branch unchanged; in
        # mixed precision the branches read a float16 copy of it, which each
        # norm backward writes as it updates dx. Each norm backward also sums
        # the c_proj bias gradient of the branch below it (proj_bias_sums).
        dx_low = None if self.compute_dtype == self.dtype else \
            self.xp.empty(dhidden.shape, dtype=self.compute_dtype)    # (N, C)

        def bias_sum_below(i):
            """Where the norm above block i's output sums its mlp c_proj bias gradient."""
            return None if i < 0 else \
                proj_bias_sums(p_drop > 0, G.get(f"h.{i}.mlp.c_proj.bias"))[0]

        dx = norm_backward(cfg, dhidden, lnf_cache, P, G, "ln_f", dx_low=dx_low,
                           dx_sum=bias_sum_below(cfg.n_layer - 1))           # (N, C)
        for i in reversed(range(cfg.n_layer)):
            cache = block_caches[i]
            if self.recompute == "block":
                block_input, block_seed = cache
                _, cache = self._block_forward(i, block_input, (B, T), p_drop, block_seed, rope)
            block_backward(cfg, i, dx, cache, P, W, G, dx_low,
                           input_low=dx_low if i > 0 else None, input_sum=bias_sum_below(i - 1))
        demb = embedding_noise_backward(dropout_backward(dx.reshape(B, T, cfg.n_embd),
                                                         emb_mask))            # (B, T, C)
        embedding_backward(demb, idx, G["wte.weight"], G.get("wpe.weight"))

    def rope_tables(self, start, T):
        """(cos, sin) (T, D/2) of positions start .. start+T-1, or None with learned positions."""
        cfg = self.config
        if cfg.position != "rope":
            return None
        cos, sin = rope_tables(start + T, cfg.head_size, cfg.rope_theta, self.device, self.dtype)
        return cos[start:], sin[start:]

    @property
    def head_weight_name(self):
        """The (V, C) matrix the logits are computed with."""
        return "wte.weight" if self.config.tie_embeddings else "lm_head.weight"

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
        check_token_ids(what, idx, self.config.vocab_size)
        return to_device(idx.astype(numpy.int64, copy=False), self.device)

    def _check_targets(self, targets, shape):
        if getattr(targets, "shape", None) != shape:
            raise ValueError(f"targets must have the shape of idx {shape}, "
                             f"got {getattr(targets, 'shape', None)}")
        check_token_ids("targets", targets, self.config.vocab_size, ignored=IGNORE_INDEX)
        return to_device(targets.astype(numpy.int64, copy=False), self.device)

    def state_arrays(self):
        """name -> host (NumPy) copy of every parameter, which later steps leave as it is."""
        flat = to_host(self.flat_params)   # one transfer from a GPU
        if flat is self.flat_params:       # on the CPU to_host hands back the buffer itself
            flat = flat.copy()
        return self.layout.views(flat)

    def load_state_arrays(self, arrays):
        """Copy named arrays (host or device) into the parameters, every name,
        shape and value (real, finite in the model's dtype) checked before
        any is copied."""
        if not isinstance(arrays, Mapping):
            raise ValueError(f"parameters must be a mapping of names to arrays, got "
                             f"{type(arrays).__name__}")
        missing = [n for n in self.layout.names if n not in arrays]
        unexpected = [n for n in arrays if n not in self.layout.shapes]
        if missing or unexpected:
            raise ValueError(f"parameter names do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, view in self.params.items():
            shape = getattr(arrays[name], "shape", None)
            if shape is None or tuple(shape) != tuple(view.shape):
                raise ValueError(f"parameter {name}: shape {shape} does not match the model's "
                                 f"{tuple(view.shape)}")
            check_real_values(f"parameter {name}", arrays[name], self.dtype)
        for name, view in self.params.items():
            view[...] = to_device(numpy.asarray(to_host(arrays[name]), dtype=self.dtype), self.device)


def check_model(model, who):
    """TypeError unless `model` is a GPT (or, as Muon's AdamW parts are, holds
    flat buffers laid out as one does): for functions that take a model."""
    if not (hasattr(model, "flat_params") and hasattr(model, "layout")):
        raise TypeError(f"{who} takes a GPT model, got {type(model).__name__}")


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


def check_token_ids(what, ids, vocab_size, ignored=None):
    """Refuse `ids` (an array, host or device) unless they are integers in
    [0, vocab_size), or `ignored` (a negative id: a target that is skipped)."""
    if not numpy.issubdtype(ids.dtype, numpy.integer):
        raise ValueError(f"{what} must hold integers, got {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())   # one small sync for a device array
    lowest = 0 if ignored is None else min(ignored, 0)
    if low < lowest or high >= vocab_size:
        allowed = "" if ignored is None else f" or {ignored}"
        raise ValueError(f"{what}: token ids must be in [0, {vocab_size}){allowed}, "
                         f"got range [{low}, {high}]")
