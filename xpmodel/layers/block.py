"""One transformer block, the unit the model repeats, from the chosen options.

Pre-norm wiring: x += attn(ln_1(x)); x += mlp(ln_2(x)), ln_1 and ln_2 being
LayerNorm or RMSNorm (GPT-2's names for them either way). Which norm and
which MLP activation it uses is chosen in the two tables below; every entry
is a forward/backward pair with the same signature, so a new variant is one
layer file, one line here and its name in xpmodel/options.py, the choices the
run config offers (tests/test_imports.py checks the two agree).

Parameters come as name -> array mappings: P, the master weights (norms read
them in full precision); W, the weights the matmuls use (a float16 copy in
mixed precision); G, the gradients backward adds into. Keys a config does not
have (biases with bias false, the QK-norm weights without qk_norm) are absent.

Each projection's bias is added by the layer after it (the head split, the
activation, the residual add), which on CuPy saves a launch each; the head
merge and the activation's backward sum their biases' gradients.
"""
from typing import NamedTuple

from .attention import attention_backward, attention_forward
from .dropout import dropout_backward, dropout_mask
from .gelu import gelu_backward, gelu_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward
from .matmul import matmul
from .relu2 import relu2_backward, relu2_forward
from .residual import residual_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .swiglu import swiglu_backward, swiglu_forward

# name (options.NORMS, options.MLPS) -> (forward, backward)
NORM_LAYERS = {"layernorm": (layernorm_forward, layernorm_backward),
               "rmsnorm": (rmsnorm_forward, rmsnorm_backward)}
ACTIVATIONS = {"gelu": (gelu_forward, gelu_backward),
               "swiglu": (swiglu_forward, swiglu_backward),
               "relu2": (relu2_forward, relu2_backward)}


class BlockCache(NamedTuple):
    """What one block's backward reads from its forward (h, act_cache and g
    are None when the forward was told not to keep them)."""
    ln1: object          # (N, C) ln_1's output, in the compute dtype
    ln1_cache: object    # ln_1's statistics: normalised x (N, C) and 1/std (N, 1), float32 or wider
    y: object            # (N, C) attention output, before c_proj
    attn_cache: object   # attention.AttentionCache: the heads and what the core kept
    attn_mask: object    # dropout.KeepMask (N, C) of the attention branch, or None
    ln2: object          # (N, C) ln_2's output, in the compute dtype
    ln2_cache: object    # ln_2's statistics, as ln1_cache
    h: object            # (N, F or 2F) c_fc's output, its bias added
    act_cache: object    # (N, F) the xp GELU's or SwiGLU's saved sigmoid; None from a fused kernel
    g: object            # (N, F) the activation's output
    mlp_mask: object     # dropout.KeepMask (N, C) of the MLP branch, or None


def norm_forward(cfg, x, P, name, out_dtype):
    """The configured norm of x (N, C) with the weights `name`.weight / .bias."""
    forward = NORM_LAYERS[cfg.norm][0]
    return forward(x, P[name + ".weight"], P.get(name + ".bias"), out_dtype, cfg.norm_eps)


def norm_backward(cfg, dout, cache, P, G, name, **kwargs):
    """norm_forward's backward: dout (N, C) -> dx (N, C); the gradients of
    `name`.weight / .bias are added into G. kwargs (dx, dx_low, dx_sum) as the
    norm's backward takes them (layernorm.layernorm_backward)."""
    backward = NORM_LAYERS[cfg.norm][1]
    return backward(dout, cache, P[name + ".weight"], G[name + ".weight"], G.get(name + ".bias"),
                    **kwargs)


def _qk_norm(cfg, P, p):
    """(w_q, w_k, eps) of block prefix p's QK-norm, or None."""
    return (P[p + "attn.q_norm.weight"], P[p + "attn.k_norm.weight"], cfg.norm_eps) \
        if cfg.qk_norm else None


def block_forward(cfg, layer, x, shape, P, W, low, p_drop=0.0, rng=None, rope=None, kv_cache=None,
                  keep_mlp=True):
    """x: (N, C) residual stream in the master dtype, updated in place; shape
    (B, T) with N = B*T; low: the compute dtype. Returns (x, BlockCache).
    keep_mlp False leaves the MLP's hidden activations out of the cache;
    backward recomputes them from ln2."""
    p = f"h.{layer}."
    B, T = shape
    ln1, ln1_cache = norm_forward(cfg, x, P, p + "ln_1", low)               # (N, C)
    qkv = matmul(ln1, W[p + "attn.c_attn.weight"])                          # (N, (H + 2 H_kv) D)
    y, attn_cache = attention_forward(qkv.reshape(B, T, cfg.qkv_width), cfg.n_head, p_drop, rng,
                                      bias=W.get(p + "attn.c_attn.bias"), n_kv_head=cfg.kv_heads,
                                      qk_norm=_qk_norm(cfg, P, p), rope=rope, kv_cache=kv_cache)
    attn_branch = matmul(y, W[p + "attn.c_proj.weight"])                    # (N, C)
    attn_mask = dropout_mask(attn_branch, p_drop, rng)
    x = residual_forward(x, attn_branch, W.get(p + "attn.c_proj.bias"), attn_mask)

    ln2, ln2_cache = norm_forward(cfg, x, P, p + "ln_2", low)               # (N, C)
    h, act_cache, g = mlp_hidden(cfg, p, ln2, W)                            # g (N, F)
    mlp_branch = matmul(g, W[p + "mlp.c_proj.weight"])                      # (N, C)
    mlp_mask = dropout_mask(mlp_branch, p_drop, rng)
    x = residual_forward(x, mlp_branch, W.get(p + "mlp.c_proj.bias"), mlp_mask)
    if not keep_mlp:
        h = act_cache = g = None
    return x, BlockCache(ln1, ln1_cache, y, attn_cache, attn_mask, ln2, ln2_cache, h, act_cache,
                         g, mlp_mask)


def block_backward(cfg, layer, dx, cache, P, W, G, dx_low=None, input_low=None, input_sum=None):
    """The block's backward, given dx (N, C), the gradient of its output
    stream in the statistics' dtype; dx is updated in place to the gradient
    of its input as each norm backward adds into it.

    dx_low: in mixed precision, a float16 copy of dx that the branches read
    and the ln_2 backward rewrites. input_low / input_sum: where the ln_1
    backward writes the float16 copy of the input's gradient and its column
    sums (the block below's c_proj bias gradient), or None.
    """
    p = f"h.{layer}."
    activation_backward = ACTIVATIONS[cfg.mlp][1]
    dbranch = dx if dx_low is None else dx_low
    mlp_bias_sum, mlp_bias = proj_bias_sums(cache.mlp_mask is not None, G.get(p + "mlp.c_proj.bias"))
    attn_bias_sum, attn_bias = proj_bias_sums(cache.attn_mask is not None,
                                              G.get(p + "attn.c_proj.bias"))
    h, act_cache, g = (cache.h, cache.act_cache, cache.g) if cache.h is not None \
        else mlp_hidden(cfg, p, cache.ln2, W)
    dmlp_out = dropout_backward(dbranch, cache.mlp_mask)
    dg = linear_backward(dmlp_out, g, W[p + "mlp.c_proj.weight"],
                         G[p + "mlp.c_proj.weight"], mlp_bias)
    dh = activation_backward(dg, h, act_cache, dbias=G.get(p + "mlp.c_fc.bias"))
    dln2 = linear_backward(dh, cache.ln2, W[p + "mlp.c_fc.weight"], G[p + "mlp.c_fc.weight"])
    norm_backward(cfg, dln2, cache.ln2_cache, P, G, p + "ln_2", dx=dx, dx_low=dx_low,
                  dx_sum=attn_bias_sum)

    dattn_out = dropout_backward(dbranch, cache.attn_mask)
    dy = linear_backward(dattn_out, cache.y, W[p + "attn.c_proj.weight"],
                         G[p + "attn.c_proj.weight"], attn_bias)
    dqk_norm = (G[p + "attn.q_norm.weight"], G[p + "attn.k_norm.weight"]) if cfg.qk_norm else None
    dqkv = attention_backward(dy, cache.attn_cache, dbias=G.get(p + "attn.c_attn.bias"),
                              qk_norm=_qk_norm(cfg, P, p), dqk_norm=dqk_norm)
    dln1 = linear_backward(dqkv, cache.ln1, W[p + "attn.c_attn.weight"],
                           G[p + "attn.c_attn.weight"])
    norm_backward(cfg, dln1, cache.ln1_cache, P, G, p + "ln_1", dx=dx, dx_low=input_low,
                  dx_sum=input_sum)
    return dx


def mlp_hidden(cfg, p, ln2, W):
    """The MLP's hidden activations from its input ln2 (N, C): h (N, F or 2F),
    c_fc's output with its bias added, the activation's cache, and g (N, F)."""
    h = matmul(ln2, W[p + "mlp.c_fc.weight"])
    g, act_cache = ACTIVATIONS[cfg.mlp][0](h, W.get(p + "mlp.c_fc.bias"))   # h += bias
    return h, act_cache, g


def proj_bias_sums(dropped, grad):
    """Where a c_proj bias's gradient is summed: (by the norm backward that
    writes the gradient its branch receives, by linear_backward); one of the
    two is None. Without dropout on the branch (dropped false), the norm
    backward's column sums of the stream's gradient are that gradient, which
    saves a pass."""
    if grad is None:
        return None, None
    return (None, grad) if dropped else (grad, None)
