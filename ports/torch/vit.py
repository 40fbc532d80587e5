"""PyTorch port of refssl's transformer models: the pre-norm block, the ViT encoder and MAE.

Written with ``torch.nn.functional`` on plain tensors named exactly like refssl's flat parameter dicts,
so a refssl parameter dict loads one to one (:func:`load_params`) and torch autograd of this forward can
be compared with refssl's hand-written backward name by name (``tests/test_torch_models.py``), or timed
against it (``benchmarks/bench_vit_step.py``).  The masking is an input, not drawn here: pass the same
``(ids_keep, mask, ids_restore)`` that refssl used and the two runs compute the same function.

Layouts are refssl's (``refssl/nn/transformer.py``), not timm's:

* linear weights are input-major ``w`` (D_in, D_out): ``y = x @ w + b``.  timm / ``nn.Linear`` store
  ``weight`` = ``w.T``; timm's attention ``qkv.weight`` (3D, D) is ``qkv.w.T``.
* the patch embedding is a linear map of patches flattened in MAE's ``patchify`` order (row, column,
  channel); timm's conv weight ``(D, C, p, p)`` is ``patch.w.reshape(p, p, C, D).permute(3, 2, 0, 1)``.
* LayerNorm eps 1e-6, exact (erf) GELU, qkv split as (3, heads, D/heads), scores scaled by
  1/sqrt(D/heads), fixed 2-D sin-cos positions with the column in the first D/2 channels
  (``../shared`` reference §21), CLS position zero.

Names: a block's params are ``norm1.*, attn.qkv.*, attn.proj.*, norm2.*, fc1.*, fc2.*``; the ViT adds
``patch.*, cls, [pos], blocks.{i}.*, norm.*``; MAE prefixes the encoder with ``enc.`` and has ``dec.embed.*,
dec.mask_token, dec.blocks.{i}.*, dec.norm.*, dec.pred.*``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LN_EPS", "load_params", "grads_numpy", "sincos_pos_embed_2d", "patchify", "linear",
           "attention", "block_forward", "stack_forward", "vit_tokens", "vit_forward", "mae_forward"]

LN_EPS = 1e-6


def load_params(params: dict, *, dtype=torch.float64, requires_grad: bool = True) -> dict:
    """refssl flat parameter dict (name -> numpy array) -> dict of fresh leaf tensors of ``dtype``.

    The tensors own their memory (the numpy arrays are copied), so autograd's ``.grad`` of each one is
    the gradient of the parameter of the same name.
    """
    out = {}
    for name, value in params.items():
        t = torch.tensor(np.asarray(value), dtype=dtype)
        out[name] = t.requires_grad_(requires_grad)
    return out


def grads_numpy(tensors: dict) -> dict:
    """``{name: tensor.grad as numpy}`` for every tensor that received a gradient."""
    return {k: t.grad.detach().cpu().numpy() for k, t in tensors.items() if t.grad is not None}


def _sub(params: dict, prefix: str) -> dict:
    p = prefix + "."
    return {k[len(p):]: v for k, v in params.items() if k.startswith(p)}


def _depth(params: dict) -> int:
    """Number of blocks ``"{i}.*"`` in a stack's parameter dict."""
    ids = {int(m.group(1)) for k in params if (m := re.match(r"(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"block indices must be 0 .. n-1, got {sorted(ids)}")
    return len(ids)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, *, cls_token: bool = True,
                        dtype=torch.float64) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding ((1 +) h w, dim); patches row-major, the first dim/2
    channels encode the column, the last dim/2 the row, each half ``[sin(w_k t)] || [cos(w_k t)]`` with
    ``w_k = 10000^(-k / (dim/4))``; the CLS row is zero.  Computed in float64, then cast."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float64) / q)
    idx = torch.arange(grid_h * grid_w)
    rows, cols = (idx // grid_w).to(torch.float64), (idx % grid_w).to(torch.float64)

    def half(t):
        ang = t[:, None] * omega[None, :]
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)

    emb = torch.cat([half(cols), half(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.to(dtype)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, h w, p p C): patches row-major, inside a patch (row, column, channel)."""
    n, c, hh, ww = images.shape
    h, w = hh // patch, ww // patch
    x = images.reshape(n, c, h, patch, w, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, patch * patch * c)


def linear(x: torch.Tensor, params: dict, prefix: str) -> torch.Tensor:
    """x @ w + b with refssl's input-major ``w`` (D_in, D_out)."""
    return F.linear(x, params[prefix + ".w"].t(), params[prefix + ".b"])


def attention(x: torch.Tensor, params: dict, n_heads: int, key_mask=None, *, sdpa: bool = False):
    """Multi-head self-attention over x (B, L, D); ``key_mask`` (B, L) bool, True = may be attended.

    ``sdpa=True`` uses ``F.scaled_dot_product_attention`` (timm's fused path); otherwise the scores,
    softmax and weighted sum are written out.  Both compute the same function.
    """
    b, length, d = x.shape
    dh = d // n_heads
    qkv = linear(x, params, "qkv").reshape(b, length, 3, n_heads, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, L, dh)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if sdpa:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
    return linear(o.transpose(1, 2).reshape(b, length, d), params, "proj")


def block_forward(params: dict, x: torch.Tensor, *, n_heads: int, key_mask=None, sdpa: bool = False):
    """Pre-norm block: h = x + Attn(LN1(x)), out = h + fc2(GELU(fc1(LN2(h))))."""
    d = x.shape[-1]
    a = F.layer_norm(x, (d,), params["norm1.gamma"], params["norm1.beta"], eps=LN_EPS)
    h = x + attention(a, _sub(params, "attn"), n_heads, key_mask, sdpa=sdpa)
    m = F.layer_norm(h, (d,), params["norm2.gamma"], params["norm2.beta"], eps=LN_EPS)
    m = linear(F.gelu(linear(m, params, "fc1")), params, "fc2")
    return h + m


def stack_forward(params: dict, x: torch.Tensor, *, n_heads: int, key_mask=None, sdpa: bool = False):
    """Blocks ``"{i}.*"`` applied in turn."""
    for i in range(_depth(params)):
        x = block_forward(_sub(params, str(i)), x, n_heads=n_heads, key_mask=key_mask, sdpa=sdpa)
    return x


def _pos(params: dict, d: int, n_patches: int, dtype) -> torch.Tensor:
    if "pos" in params:  # learned absolute positions (BEiT's option)
        return params["pos"]
    g = math.isqrt(n_patches)
    return sincos_pos_embed_2d(d, g, g, dtype=dtype)


def _embed(params: dict, images: torch.Tensor, patch: int):
    """Patch embeddings (N, L, D) without positions, and the (L + 1, D) position table."""
    x = linear(patchify(images, patch), params, "patch")
    return x, _pos(params, x.shape[-1], x.shape[1], x.dtype)


def _with_cls(params: dict, x: torch.Tensor, pos0: torch.Tensor) -> torch.Tensor:
    n, _, d = x.shape
    return torch.cat([(params["cls"] + pos0).expand(n, 1, d), x], dim=1)


def _final_norm(params: dict, x: torch.Tensor, prefix: str = "norm") -> torch.Tensor:
    d = x.shape[-1]
    return F.layer_norm(x, (d,), params[prefix + ".gamma"], params[prefix + ".beta"], eps=LN_EPS)


def vit_tokens(params: dict, images: torch.Tensor, *, patch: int, n_heads: int, sdpa: bool = False):
    """ViT encoder on full images: final normed tokens (N, L + 1, D), CLS first."""
    x, pos = _embed(params, images, patch)
    x = _with_cls(params, x + pos[1:], pos[0])
    x = stack_forward(_sub(params, "blocks"), x, n_heads=n_heads, sdpa=sdpa)
    return _final_norm(params, x)


def vit_forward(params: dict, images: torch.Tensor, *, patch: int, n_heads: int, pool: str = "cls",
                sdpa: bool = False) -> torch.Tensor:
    """Pooled ViT feature (N, D): the final CLS token or the mean of the final patch tokens."""
    y = vit_tokens(params, images, patch=patch, n_heads=n_heads, sdpa=sdpa)
    if pool == "cls":
        return y[:, 0]
    if pool == "mean":
        return y[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def _as_index(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64)


def mae_forward(params: dict, images: torch.Tensor, ids_keep, mask, ids_restore, *, patch: int,
                n_heads: int, dec_heads: int, norm_pix: bool = False, sdpa: bool = False,
                return_pred: bool = False):
    """MAE loss with a given masking (``refssl.masking.random_masking``'s triple, numpy or torch).

    Encoder on the kept patches (+ CLS), linear map to the decoder width, the mask token for each removed
    patch, unshuffle with ``ids_restore``, decoder positions, decoder blocks and norm, linear head, CLS
    dropped; loss = mean over removed patches of the per-patch mean squared error (target per-patch
    standardised with unbiased variance + 1e-6 when ``norm_pix``).
    """
    pe, pd = _sub(params, "enc"), _sub(params, "dec")
    ids_keep, ids_restore = _as_index(ids_keep), _as_index(ids_restore)
    x, pos = _embed(pe, images, patch)
    n, length, d = x.shape
    x = x + pos[1:]
    xv = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, d))
    lat = stack_forward(_sub(pe, "blocks"), _with_cls(pe, xv, pos[0]), n_heads=n_heads, sdpa=sdpa)
    lat = _final_norm(pe, lat)

    y = linear(lat, pd, "embed")
    dd = y.shape[-1]
    keep = ids_keep.shape[1]
    tokens = torch.cat([y[:, 1:], pd["mask_token"].expand(n, length - keep, dd)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, dd))
    g = math.isqrt(length)
    z = torch.cat([y[:, :1], tokens], dim=1) + sincos_pos_embed_2d(dd, g, g, dtype=y.dtype)
    z = stack_forward(_sub(pd, "blocks"), z, n_heads=dec_heads, sdpa=sdpa)
    pred = linear(_final_norm(pd, z)[:, 1:], pd, "pred")

    target = patchify(images, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, unbiased=True, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).to(pred.dtype)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    loss = (per_patch * m).sum() / m.sum()
    return (loss, pred) if return_pred else loss
