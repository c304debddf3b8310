"""The same GPT-2 written with PyTorch ops: the reference that tests and
benchmarks compare xpmodel against. Parameters are a dict of tensors with
xpmodel's names and (in, out) layout, so weights copy across unchanged."""
import math

import torch
import torch.nn.functional as F


def torch_params(arrays, dtype=torch.float32, device="cpu", out_in=False):
    """name -> leaf tensor requiring grad, from name -> NumPy array. With
    out_in, the linear layers' weights are stored transposed, (out, in), as
    torch.nn.Linear keeps them (torch_forward then needs out_in too)."""
    def layout(name, value):
        linear = out_in and value.ndim == 2 and name.startswith("h.")
        return value.T.copy() if linear else value
    return {name: torch.tensor(layout(name, value), dtype=dtype, device=device).requires_grad_(True)
            for name, value in arrays.items()}


def torch_forward(params, idx, n_layer, n_head, dropout=0.0, training=False, fused_attention=False,
                  out_in=False):
    """idx: (B, T) LongTensor -> logits (B, T, V). out_in: the linear weights
    are (out, in), applied as torch.nn.Linear applies them (one addmm with
    the bias)."""
    B, T = idx.shape
    P = params
    x = P["wte.weight"][idx] + P["wpe.weight"][:T]
    x = F.dropout(x, dropout, training)
    C = x.shape[-1]
    D = C // n_head
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()

    def linear(h, name):
        if out_in:
            return F.linear(h, P[name + ".weight"], P[name + ".bias"])
        return h @ P[name + ".weight"] + P[name + ".bias"]
    for i in range(n_layer):
        p = f"h.{i}."
        h = F.layer_norm(x, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps=1e-5)
        qkv = linear(h, p + "attn.c_attn")
        q, k, v = (t.view(B, T, n_head, D).transpose(1, 2) for t in qkv.split(C, dim=2))
        if fused_attention:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=dropout if training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            att = F.dropout(att, dropout, training)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        x = x + F.dropout(linear(y, p + "attn.c_proj"), dropout, training)
        h = F.layer_norm(x, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps=1e-5)
        h = F.gelu(linear(h, p + "mlp.c_fc"), approximate="tanh")
        x = x + F.dropout(linear(h, p + "mlp.c_proj"), dropout, training)
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], eps=1e-5)
    return x @ P["wte.weight"].T


def torch_loss(params, idx, targets, n_layer, n_head, **kwargs):
    logits = torch_forward(params, idx, n_layer, n_head, **kwargs)
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
