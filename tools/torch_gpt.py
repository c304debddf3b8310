"""The same GPT written with PyTorch ops: the reference that tests and
benchmarks compare xpmodel against. Parameters are a dict of tensors with
xpmodel's names and (in, out) layout, so weights copy across unchanged.

Every architecture option of xpmodel.GPTConfig is computed here from the
same parameter dict (see xpmodel/model/params.py for the names): LayerNorm or
RMSNorm, learned or rotary positions (Hugging Face's rotate-half pairing),
QK-norm before the rotation, gelu / swiglu / relu2 MLPs, grouped-query
attention (query head h reads kv head h // (H / H_kv)), no biases, an
untied head. Shapes: B batch, T time, C channels, H heads of D, V vocab.
"""
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# GPTConfig's defaults (GPT-2), for options a config object does not have.
GPT2_OPTIONS = dict(norm="layernorm", norm_eps=1e-5, position="learned", rope_theta=10000.0,
                    qk_norm=False, mlp="gelu", n_kv_head=None)


def torch_params(arrays, dtype=torch.float32, device="cpu", out_in=False):
    """name -> leaf tensor requiring grad, from name -> NumPy array. With
    out_in, the linear layers' weights are stored transposed, (out, in), as
    torch.nn.Linear keeps them (torch_forward then needs out_in too)."""
    def layout(name, value):
        linear = out_in and value.ndim == 2 and name.startswith("h.")
        return value.T.copy() if linear else value
    return {name: torch.tensor(layout(name, value), dtype=dtype, device=device).requires_grad_(True)
            for name, value in arrays.items()}


def options(config, n_head=None):
    """The architecture of `config` (a GPTConfig or any object with its
    fields) as a namespace; `options(n_layer, n_head)` is GPT-2."""
    if n_head is not None:
        config = SimpleNamespace(n_layer=config, n_head=n_head)
    fields = {key: getattr(config, key, default) for key, default in GPT2_OPTIONS.items()}
    fields["n_kv_head"] = fields["n_kv_head"] or config.n_head
    return SimpleNamespace(n_layer=config.n_layer, n_head=config.n_head, **fields)


def rope_tables(T, D, theta, dtype, device):
    """cos, sin (T, D) of positions 0..T-1, each frequency written twice
    ([f_0..f_{D/2-1}, f_0..f_{D/2-1}]), computed in float64."""
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)          # (D/2,)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]     # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def rotate(x, cos, sin):
    """x (B, H, T, D) -> [x1 cos - x2 sin, x2 cos + x1 sin] with x1, x2 its halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def torch_forward(params, idx, config, n_head=None, dropout=0.0, training=False,
                  fused_attention=False, out_in=False):
    """idx: (B, T) LongTensor -> logits (B, T, V). config: a GPTConfig, or
    n_layer followed by n_head for GPT-2. fused_attention: F.scaled_dot_product_attention
    (GQA by enable_gqa); otherwise the T x T scores. out_in: the linear
    weights are (out, in), applied as torch.nn.Linear applies them."""
    cfg = options(config, n_head)
    B, T = idx.shape
    P = params
    x = P["wte.weight"][idx]
    if cfg.position == "learned":
        x = x + P["wpe.weight"][:T]
    x = F.dropout(x, dropout, training)
    C = x.shape[-1]
    H, Hkv = cfg.n_head, cfg.n_kv_head
    D = C // H
    if cfg.position == "rope":
        cos, sin = rope_tables(T, D, cfg.rope_theta, x.dtype, x.device)
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()

    def linear(h, name):
        weight, bias = P[name + ".weight"], P.get(name + ".bias")
        if out_in:
            return F.linear(h, weight, bias)
        return h @ weight if bias is None else h @ weight + bias

    def norm(h, name):
        if cfg.norm == "rmsnorm":
            return F.rms_norm(h, (h.shape[-1],), P[name + ".weight"], eps=cfg.norm_eps)
        return F.layer_norm(h, (h.shape[-1],), P[name + ".weight"], P.get(name + ".bias"),
                            eps=cfg.norm_eps)

    def heads(t, n):   # (B, T, n D) -> (B, n, T, D)
        return t.view(B, T, n, D).transpose(1, 2)

    for i in range(cfg.n_layer):
        p = f"h.{i}."
        q, k, v = linear(norm(x, p + "ln_1"), p + "attn.c_attn").split([H * D, Hkv * D, Hkv * D],
                                                                         dim=2)
        q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
        if cfg.qk_norm:   # RMSNorm over each head, whatever cfg.norm is
            q = F.rms_norm(q, (D,), P[p + "attn.q_norm.weight"], eps=cfg.norm_eps)
            k = F.rms_norm(k, (D,), P[p + "attn.k_norm.weight"], eps=cfg.norm_eps)
        if cfg.position == "rope":
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if fused_attention:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H,
                                               dropout_p=dropout if training else 0.0)
        else:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            att = F.dropout(att, dropout, training)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + F.dropout(linear(y, p + "attn.c_proj"), dropout, training)
        h = linear(norm(x, p + "ln_2"), p + "mlp.c_fc")
        if cfg.mlp == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif cfg.mlp == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        x = x + F.dropout(linear(h, p + "mlp.c_proj"), dropout, training)
    x = norm(x, "ln_f")
    return x @ P.get("lm_head.weight", P["wte.weight"]).T


def torch_loss(params, idx, targets, config, n_head=None, **kwargs):
    logits = torch_forward(params, idx, config, n_head, **kwargs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1)


def torch_adamw(params, lr, betas, eps, weight_decay, fused=None):
    """AdamW with decay on matrices only, as xpmodel groups its parameters;
    fused: PyTorch's one-kernel CUDA implementation."""
    decay = [t for t in params.values() if t.dim() >= 2]
    no_decay = [t for t in params.values() if t.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps, fused=fused)
