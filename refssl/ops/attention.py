"""Attention ops: token embedding, scaled dot-product attention, multi-head self-attention."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import register
from ._layer_checks import param, upstream


def _int_ids(ids, name="ids"):
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a numpy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    return ids


# -- embedding ---------------------------------------------------------------------------------------

def embedding_forward(ids, table):
    """Rows of a table looked up by integer ids (token embeddings).

        out[..., :] = table[ids[...], :]

    Shapes: ids any shape, integer, values in [0, V); table (V, D) -> out ids.shape + (D,).  ``ids`` gets no
    gradient (None); the table's gradient scatter-adds the upstream rows, so a repeated id accumulates.

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (§3.4); PyTorch torch/nn/modules/sparse.py (Embedding).
    Backward: derivations/attention_backward.md#embedding.
    """
    _int_ids(ids)
    V.float_array(table, "table", ndim=2, shape_doc="(V, D)")
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise ValueError(f"ids must be in [0, {v}) (the rows of table), got range [{ids.min()}, {ids.max()}]")
    return table[ids], (ids, table.shape, table.dtype)


def embedding_backward(cache, grad_out):
    """dtable[v] = sum of grad_out over the positions whose id is v; None for ids."""
    ids, (v, d), dtype = cache
    g = upstream(grad_out, ids.shape + (d,), dtype)
    flat = ids.reshape(-1)
    dtable = np.zeros((v, d), dtype)
    np.add.at(dtable, flat, g.reshape(-1, d))
    return None, dtable


def _embedding_example(rng, dtype=np.float64):
    v, d = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    shape = tuple(int(s) for s in rng.integers(1, 4, size=int(rng.integers(1, 3))))
    return (rng.integers(0, v, size=shape), rng.standard_normal((v, d)).astype(dtype)), {}


register(
    "embedding",
    forward=embedding_forward,
    backward=embedding_backward,
    example=_embedding_example,
    differentiable=(1,),
    reference="Vaswani et al. 2017, arXiv 1706.03762; PyTorch torch/nn/modules/sparse.py (Embedding)",
    derivation="derivations/attention_backward.md#embedding",
)


# -- scaled dot-product attention --------------------------------------------------------------------

def _check_key_mask(key_mask, b, lk):
    if key_mask is None:
        return None
    if not isinstance(key_mask, np.ndarray):
        raise TypeError(f"key_mask must be a numpy bool array or None, got {type(key_mask).__name__}")
    if key_mask.dtype != np.bool_:
        raise TypeError(f"key_mask must be a bool array (True = may be attended), got dtype {key_mask.dtype}")
    if key_mask.shape != (b, lk):
        raise ValueError(f"key_mask must have shape (B, Lk) = ({b}, {lk}), got shape {key_mask.shape}")
    if not key_mask.any(axis=1).all():
        bad = int(np.flatnonzero(~key_mask.any(axis=1))[0])
        raise ValueError(f"key_mask masks every key of batch row {bad}: its queries would attend to nothing")
    return key_mask


def _sdpa(q, k, v, key_mask):
    """Core of attention (inputs validated): out, probabilities."""
    dt = q.dtype
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= dt.type(1.0 / np.sqrt(q.shape[-1]))
    if key_mask is not None:
        s[~np.broadcast_to(key_mask[:, None, None, :], s.shape)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v), s


def _sdpa_backward(q, k, v, p, out, g):
    """dq, dk, dv of softmax(q k^T / sqrt(dh)) v given probabilities p and output out."""
    dt = q.dtype
    dp = np.matmul(g, np.swapaxes(v, -1, -2))
    # softmax backward: dS = P (dP - rowsum(dP P)), with rowsum(dP P) = rowsum(g out)
    dp -= np.sum(g * out, axis=-1, keepdims=True)
    dp *= p
    dp *= dt.type(1.0 / np.sqrt(q.shape[-1]))
    dq = np.matmul(dp, k)
    dk = np.matmul(np.swapaxes(dp, -1, -2), q)
    dv = np.matmul(np.swapaxes(p, -1, -2), g)
    return dq, dk, dv


def scaled_dot_product_attention_forward(q, k, v, key_mask=None):
    """Softmax attention of queries over keys, per batch row and head.

        S = q k^T / sqrt(dh),   P = softmax over keys of S (masked keys: P = 0),   out = P v

    Shapes: q (B, H, Lq, dh), k and v (B, H, Lk, dh); ``key_mask`` (B, Lk) bool or None, True where a key
    may be attended (padding) -> out (B, H, Lq, dh).  Gradients to q, k, v, and None for the mask when one
was given (one slot per array input).  A batch row
    whose keys are all masked is a ValueError (its softmax would be 0/0).

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (§3.2.1); PyTorch
    torch/nn/functional.py (scaled_dot_product_attention).
    Backward: derivations/attention_backward.md#scaled_dot_product_attention.
    """
    V.float_array(q, "q", ndim=4, shape_doc="(B, H, Lq, dh)")
    V.float_array(k, "k", ndim=4, shape_doc="(B, H, Lk, dh)")
    V.float_array(v, "v", ndim=4, shape_doc="(B, H, Lk, dh)")
    V.same_dtype([q, k, v], ["q", "k", "v"])
    V.same_shape([k, v], ["k", "v"])
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have shape (B, H, Lk, dh) with B, H, dh of q {q.shape}, got shape {k.shape}")
    mask = _check_key_mask(key_mask, q.shape[0], k.shape[2])
    out, p = _sdpa(q, k, v, mask)
    return out, (q, k, v, p, out, mask is not None)


def scaled_dot_product_attention_backward(cache, grad_out):
    """dS = P (dP - rowsum(g out)), dP = g v^T; dq = dS k / sqrt(dh), dk = dS^T q / sqrt(dh), dv = P^T g."""
    q, k, v, p, out, masked = cache
    g = upstream(grad_out, out.shape, out.dtype)
    return _sdpa_backward(q, k, v, p, out, g) + ((None,) if masked else ())


def attention_probs(cache):
    """The attention weights P (B, H, Lq, Lk) of a scaled_dot_product_attention forward pass."""
    return cache[3]


def _sdpa_example(rng, dtype=np.float64):
    b, h = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    lq, lk, dh = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
    q, k, v = (rng.standard_normal((b, h, n, dh)).astype(dtype) for n in (lq, lk, lk))
    args = (q, k, v)
    if rng.random() < 0.5:
        mask = rng.random((b, lk)) < 0.7
        mask[np.arange(b), rng.integers(0, lk, size=b)] = True
        args = args + (mask,)
    return args, {}


register(
    "scaled_dot_product_attention",
    forward=scaled_dot_product_attention_forward,
    backward=scaled_dot_product_attention_backward,
    example=_sdpa_example,
    differentiable=(0, 1, 2),
    reference="Vaswani et al. 2017, arXiv 1706.03762; PyTorch torch/nn/functional.py "
              "(scaled_dot_product_attention)",
    derivation="derivations/attention_backward.md#scaled_dot_product_attention",
)


# -- multi-head self-attention -----------------------------------------------------------------------

def multi_head_attention_forward(x, w_qkv, b_qkv, w_out, b_out, key_mask=None, *, n_heads):
    """Multi-head self-attention with a fused qkv projection (timm/MAE layout).

        [q | k | v] = x w_qkv + b_qkv, the 3D features split as (3, n_heads, D / n_heads) in that order,
        o_h = softmax(q_h k_h^T / sqrt(D / n_heads)) v_h,   out = concat_h(o_h) w_out + b_out

    Shapes: x (B, L, D), w_qkv (D, 3D) input-major (timm's ``qkv.weight`` (3D, D) transposed), b_qkv (3D,),
    w_out (D, D) (``proj.weight`` transposed), b_out (D,), ``key_mask`` (B, L) bool or None -> out (B, L, D).
    ``n_heads`` must divide D.  None for the mask (a sixth gradient slot only when a mask was given).

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (§3.2.2); Dosovitskiy et al. 2020, arXiv 2010.11929;
    timm timm/models/vision_transformer.py (Attention).
    Backward: derivations/attention_backward.md#multi_head_attention.
    """
    V.float_array(x, "x", ndim=3, shape_doc="(B, L, D)")
    h = V.positive_int(n_heads, "n_heads")
    b, length, d = x.shape
    if d % h:
        raise ValueError(f"n_heads must divide the width D = {d}, got n_heads = {h}")
    param(w_qkv, "w_qkv", (d, 3 * d), "(D, 3D)", x)
    param(b_qkv, "b_qkv", (3 * d,), "(3D,)", x)
    param(w_out, "w_out", (d, d), "(D, D)", x)
    param(b_out, "b_out", (d,), "(D,)", x)
    mask = _check_key_mask(key_mask, b, length)
    dh = d // h
    x2 = x.reshape(b * length, d)
    qkv = x2 @ w_qkv
    qkv += b_qkv
    # (B, L, 3, H, dh) -> (3, B, H, L, dh): one copy, then q, k, v are contiguous views
    qkv = np.ascontiguousarray(qkv.reshape(b, length, 3, h, dh).transpose(2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    o, p = _sdpa(q, k, v, mask)
    o2 = o.transpose(0, 2, 1, 3).reshape(b * length, d)
    out = o2 @ w_out
    out += b_out
    return out.reshape(b, length, d), (x2, w_qkv, w_out, qkv, p, o, o2, (b, length, d, h), mask is not None)


def multi_head_attention_backward(cache, grad_out):
    """Linear backward of the output projection, attention backward per head, merge of (dq, dk, dv) in the
    (3, H, dh) layout, linear backward of the qkv projection; None for the mask."""
    x2, w_qkv, w_out, qkv, p, o, o2, (b, length, d, h), masked = cache
    g = upstream(grad_out, (b, length, d), x2.dtype).reshape(b * length, d)
    dw_out = o2.T @ g
    db_out = g.sum(axis=0)
    do = (g @ w_out.T).reshape(b, length, h, d // h).transpose(0, 2, 1, 3)
    dqkv = np.empty_like(qkv)
    dqkv[0], dqkv[1], dqkv[2] = _sdpa_backward(qkv[0], qkv[1], qkv[2], p, o, do)
    dqkv2 = dqkv.transpose(1, 3, 0, 2, 4).reshape(b * length, 3 * d)
    dw_qkv = x2.T @ dqkv2
    db_qkv = dqkv2.sum(axis=0)
    dx = (dqkv2 @ w_qkv.T).reshape(b, length, d)
    return (dx, dw_qkv, db_qkv, dw_out, db_out) + ((None,) if masked else ())


def multi_head_attention_probs(cache):
    """The attention weights (B, H, L, L) of a multi_head_attention forward pass."""
    return cache[4]


def _mha_example(rng, dtype=np.float64):
    h = int(rng.integers(1, 4))
    d = h * int(rng.integers(1, 3))
    b, length = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    x = rng.standard_normal((b, length, d)).astype(dtype)
    w_qkv = (rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(dtype)
    b_qkv = (0.1 * rng.standard_normal(3 * d)).astype(dtype)
    w_out = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    b_out = (0.1 * rng.standard_normal(d)).astype(dtype)
    args = (x, w_qkv, b_qkv, w_out, b_out)
    if rng.random() < 0.5:
        mask = rng.random((b, length)) < 0.7
        mask[np.arange(b), rng.integers(0, length, size=b)] = True
        args = args + (mask,)
    return args, {"n_heads": h}


register(
    "multi_head_attention",
    forward=multi_head_attention_forward,
    backward=multi_head_attention_backward,
    example=_mha_example,
    differentiable=(0, 1, 2, 3, 4),
    reference="Vaswani et al. 2017, arXiv 1706.03762; Dosovitskiy et al. 2020, arXiv 2010.11929; "
              "timm timm/models/vision_transformer.py (Attention)",
    derivation="derivations/attention_backward.md#multi_head_attention",
)
