"""The attention ops of a Vision Transformer: token embedding, scaled dot-product attention, multi-head attention.

Layout conventions follow timm's ``VisionTransformer`` as used by MAE and BEiT
(canonical-definitions §21): activations are (B, L, D) token sequences, one linear layer produces the 3D
query/key/value features split as (3, n_heads, D/n_heads) in that order, scores are q k^T / sqrt(dh) with a
softmax over keys, and the heads are concatenated before the output projection.

Implementation notes (the numbers are in benchmarks/bench_attention.py):

* The softmax weights are stored key-major, ``pt[n, j, i] = P[n, i, j]`` for the n-th (batch, head) slice.
  The max / sum over keys then run down the rows of each slice (a vectorised elementwise reduction instead
  of one short reduction per row), and every product is a plain or first-operand-transposed GEMM: numpy's
  stacked matmul is about 3x slower when its *second* operand is a transposed view.
* The (batch, head) slices are processed in blocks of about 2^17 score entries, so the shift, exp, sum and
  scale of a block stay in cache between steps, and the blocks are spread over refssl's small thread pool
  (numpy releases the GIL), which is what puts both cores to work on the many small per-head GEMMs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import validation as V
from .._blocks import map_row_blocks
from ..registry import register
from ._layer_checks import param, upstream
from .linear import _affine, _affine_backward

__all__ = [
    "embedding_forward",
    "embedding_backward",
    "scaled_dot_product_attention_forward",
    "scaled_dot_product_attention_backward",
    "attention_probs",
    "multi_head_attention_forward",
    "multi_head_attention_backward",
    "multi_head_attention_probs",
]

_BLOCK_SCORES = 1 << 17  # score entries per block: ~512 KB in float32, cache-resident across the fused steps
_BLAS_THREADED_MNK = 1 << 18  # OpenBLAS threads one GEMM itself above about this m*n*k; then blocks run in turn


# -- embedding ------------------------------------------------------------------------------------------------
def embedding_forward(ids, table):
    """Look up one row of ``table`` per integer id.

        out[..., :] = table[ids[...], :]

    Shapes: ids any shape, integer dtype, values in [0, V); table (V, D) -> out ``ids.shape + (D,)``.
    ``ids`` gets no gradient; repeated ids accumulate into the same row of the table's gradient.

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (section 3.4, embeddings); PyTorch
    torch/nn/modules/sparse.py (``nn.Embedding``).  Backward: derivations/attention_backward.md#embedding.
    """
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids must be a numpy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.size == 0:
        raise ValueError(f"ids must not be empty, got shape {ids.shape}")
    V.float_array(table, "table", ndim=2, shape_doc="(V, D)")
    n_rows = table.shape[0]
    lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= n_rows:
        raise ValueError(f"ids must lie in [0, V) = [0, {n_rows}) (rows of table), got values in [{lo}, {hi}]")
    return np.take(table, ids, axis=0), (ids, table.shape, table.dtype)


def embedding_backward(cache, grad_out):
    """dtable[v] = sum of grad_out over the positions whose id is v (scatter-add); no gradient for ids.

    The scatter-add is the product E^T g with E the (n, V) one-hot matrix of the ids, done as a sparse
    matrix product: about 20x faster than ``np.add.at`` for a (8320, 128) gradient.
    """
    ids, (n_rows, width), dtype = cache
    g = upstream(grad_out, ids.shape + (width,), dtype)
    flat = ids.reshape(-1).astype(np.intp, copy=False)
    onehot = sp.csr_matrix((np.ones(flat.size, dtype=dtype), flat, np.arange(flat.size + 1)),
                           shape=(flat.size, n_rows))
    dtable = np.asarray(onehot.T @ g.reshape(flat.size, width), dtype=dtype)
    return None, dtable


def _embedding_example(rng, dtype=np.float64):
    n_rows, width = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    shape = tuple(int(s) for s in rng.integers(1, 4, size=rng.integers(1, 3)))
    ids = rng.integers(0, n_rows, size=shape)  # few rows: repeated ids are the common case
    return (ids, rng.standard_normal((n_rows, width)).astype(dtype)), {}


register(
    "embedding",
    forward=embedding_forward,
    backward=embedding_backward,
    example=_embedding_example,
    differentiable=(1,),
    reference="Vaswani et al. 2017, arXiv 1706.03762 (3.4); PyTorch torch/nn/modules/sparse.py (nn.Embedding)",
    derivation="derivations/attention_backward.md#embedding",
)


# -- attention core (shared by scaled_dot_product_attention and multi_head_attention) --------------------------
def _each_block(fn, nb, h, lq, lk, dh):
    """Call ``fn(a, b)`` on consecutive blocks of whole batch rows ``a:b`` (all h heads) covering ``range(nb)``."""
    per_block = max(1, _BLOCK_SCORES // (h * lq * lk))
    if lq * lk * dh >= _BLAS_THREADED_MNK:
        # Each per-head GEMM is large enough for BLAS to use every thread: running blocks concurrently on
        # top of that would oversubscribe the cores.
        for a in range(0, nb, per_block):
            fn(a, min(a + per_block, nb))
        return
    # map_row_blocks counts rows; its rows here are query rows, grouped into blocks of whole batch rows.
    rows = h * lq
    map_row_blocks(lambda s, e: fn(s // rows, e // rows), nb * rows, block=per_block * rows)


def _mask_bias(key_mask, dtype):
    """(B, Lk) bool -> (B, 1, Lk, 1) additive bias, shared by the heads: 0 where a key may be attended, -inf
    where not."""
    if key_mask is None:
        return None
    bias = np.where(key_mask, dtype.type(0), dtype.type(-np.inf)).astype(dtype, copy=False)
    return bias[:, None, :, None]


def _attend(q, k, v, bias, scale, out):
    """Softmax attention of independent (batch, head) slices, forward; the output is written into ``out``.

    q (B, H, Lq, dh), k and v (B, H, Lk, dh), out (B, H, Lq, dh), any of them strided views (every 2-D
    slice with unit stride along dh, as BLAS takes it: the heads of a qkv projection or of a merged
    (B, L, H, dh) buffer); bias None or (B, 1, Lk, 1) -> pt (B, H, Lk, Lq), the softmax weights stored
    key-major (pt[b, h, j, i] = P[b, h, i, j]).
    """
    nb, h, lq, dh = q.shape
    lk = k.shape[2]
    dtype = q.dtype
    pt = np.empty((nb, h, lk, lq), dtype=dtype)

    def block(a, b):
        qs_t = np.multiply(q[a:b].transpose(0, 1, 3, 2), scale, out=np.empty((b - a, h, dh, lq), dtype=dtype))
        s = np.matmul(k[a:b], qs_t, out=pt[a:b])  # S^T = K (c Q)^T
        if bias is not None:
            s += bias[a:b]  # -inf on masked keys: exp gives exactly 0 there
        np.subtract(s, s.max(axis=2, keepdims=True), out=s)  # max over keys (>= 1 attendable: finite)
        np.exp(s, out=s)
        z = s.sum(axis=2, keepdims=True)
        s *= np.reciprocal(z, out=z)
        np.matmul(s.transpose(0, 1, 3, 2), v[a:b], out=out[a:b])  # O = P V

    _each_block(block, nb, h, lq, lk, dh)
    return pt


def _attend_backward(q, k, v, pt, out, g, scale, dq, dk, dv):
    """Backward of :func:`_attend` for upstream g (B, H, Lq, dh); writes dq, dk, dv (preallocated, possibly
    strided views) in place.

    dP = g v^T;  dS = P * (dP - rowsum(g * out));  dq = c dS k;  dk = c dS^T q;  dv = P^T g
    (derivations/attention_backward.md, AT2-AT4), all on the key-major layout.  The factor c of dq and dk
    is taken into dS itself (AT8): it rides on the transposed copy of g the GEMM needs anyway and on the
    (B, H, Lq) row sums, instead of two more passes over dq and dk, strided views of the qkv gradient.
    """
    nb, h, lq, dh = q.shape
    lk = k.shape[2]

    def block(a, b):
        gc_t = np.multiply(g[a:b].transpose(0, 1, 3, 2), scale, out=np.empty((b - a, h, dh, lq), dtype=g.dtype))
        ds_t = np.matmul(v[a:b], gc_t)  # c dP^T = V (c g)^T
        # rowsum(dP * P) = rowsum(g * out): Lq*dh products instead of Lq*Lk, and P is not read twice
        rows = np.einsum("bhid,bhid->bhi", g[a:b], out[a:b])
        rows *= scale
        ds_t -= rows[:, :, None, :]
        ds_t *= pt[a:b]  # c dS^T
        np.matmul(ds_t.transpose(0, 1, 3, 2), k[a:b], out=dq[a:b])
        np.matmul(ds_t, q[a:b], out=dk[a:b])
        np.matmul(pt[a:b], g[a:b], out=dv[a:b])

    _each_block(block, nb, h, lq, lk, dh)


def _check_key_mask(key_mask, batch, n_keys, shape_doc):
    if key_mask is None:
        return None
    if not isinstance(key_mask, np.ndarray) or key_mask.dtype != np.bool_:
        what = f"dtype {key_mask.dtype}" if isinstance(key_mask, np.ndarray) else type(key_mask).__name__
        raise TypeError(f"key_mask must be a boolean numpy array {shape_doc} (True = key may be attended), "
                        f"got {what}")
    if key_mask.shape != (batch, n_keys):
        raise ValueError(f"key_mask must have shape {shape_doc} = {(batch, n_keys)}, got shape {key_mask.shape}")
    empty = np.flatnonzero(~key_mask.any(axis=1))
    if empty.size:
        raise ValueError(f"key_mask masks every key of batch row(s) {empty[:8].tolist()}: each query needs at "
                         f"least one attendable key (its softmax would be 0/0)")
    return key_mask


# -- scaled_dot_product_attention -------------------------------------------------------------------------------
def scaled_dot_product_attention_forward(q, k, v, key_mask=None):
    """Softmax attention of every query over the keys of its (batch, head) slice.

        S = q k^T / sqrt(dh)  (+ -inf where key_mask is False),  P = softmax over keys of S,  out = P v

    Shapes: q (B, H, Lq, dh), k and v (B, H, Lk, dh), key_mask None or bool (B, Lk), True where a key may
    be attended (a padding mask shared by all heads and queries) -> out (B, H, Lq, dh).  Masked keys get
    probability exactly 0 and zero gradient; a batch row with every key masked is a ValueError.  The
    softmax is max-shifted.  ``backward`` returns (dq, dk, dv, None): key_mask gets no gradient.
    :func:`attention_probs` returns P from the cache.

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (eq. 1); PyTorch
    torch.nn.functional.scaled_dot_product_attention (boolean ``attn_mask``, True = take part).
    Backward: derivations/attention_backward.md#scaled_dot_product_attention.
    """
    V.float_array(q, "q", ndim=4, shape_doc="(B, H, Lq, dh)")
    V.float_array(k, "k", ndim=4, shape_doc="(B, H, Lk, dh)")
    V.float_array(v, "v", ndim=4, shape_doc="(B, H, Lk, dh)")
    V.same_dtype([q, k, v], ["q", "k", "v"])
    b, h, lq, dh = q.shape
    if q.size == 0:
        raise ValueError(f"q must not be empty, got shape {q.shape}")
    if k.shape[:2] != (b, h) or k.shape[3] != dh or k.shape[2] == 0:
        raise ValueError(f"k must have shape (B, H, Lk, dh) = ({b}, {h}, Lk, {dh}) with Lk >= 1 (B, H, dh "
                         f"of q), got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got shape {v.shape}")
    lk = k.shape[2]
    key_mask = _check_key_mask(key_mask, b, lk, "(B, Lk)")
    scale = q.dtype.type(1.0 / np.sqrt(dh))
    out = np.empty((b, h, lq, dh), dtype=q.dtype)
    pt = _attend(q, k, v, _mask_bias(key_mask, q.dtype), scale, out)
    return out, (q, k, v, pt, out, scale)


def scaled_dot_product_attention_backward(cache, grad_out):
    """dq = c dS k, dk = c dS^T q, dv = P^T g with dS = P * (g v^T - rowsum(g * out)), c = 1/sqrt(dh)."""
    q, k, v, pt, out, scale = cache
    g = upstream(grad_out, out.shape, q.dtype)
    dq, dk, dv = (np.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
    _attend_backward(q, k, v, pt, out, g, scale, dq, dk, dv)
    return dq, dk, dv, None


def attention_probs(cache):
    """The softmax weights P (B, H, Lq, Lk) that a forward pass computed (a copy; rows sum to 1)."""
    pt = cache[3]
    return np.ascontiguousarray(pt.transpose(0, 1, 3, 2))


def _random_key_mask(rng, batch, n_keys):
    """Half the time every key is attendable, else a random mask with >= 1 attendable key per batch row.

    Always an array, never None: golden vectors store every positional input as a numeric array.
    """
    mask = np.ones((batch, n_keys), dtype=bool)
    if rng.random() < 0.5:
        mask = rng.random((batch, n_keys)) < 0.6
        mask[np.arange(batch), rng.integers(0, n_keys, size=batch)] = True
    return mask


def _sdpa_example(rng, dtype=np.float64):
    b, h = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    lq, lk, dh = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
    q = rng.standard_normal((b, h, lq, dh)).astype(dtype)
    k = rng.standard_normal((b, h, lk, dh)).astype(dtype)
    v = rng.standard_normal((b, h, lk, dh)).astype(dtype)
    return (q, k, v, _random_key_mask(rng, b, lk)), {}


register(
    "scaled_dot_product_attention",
    forward=scaled_dot_product_attention_forward,
    backward=scaled_dot_product_attention_backward,
    example=_sdpa_example,
    differentiable=(0, 1, 2),
    reference="Vaswani et al. 2017, arXiv 1706.03762 (eq. 1); PyTorch torch.nn.functional."
              "scaled_dot_product_attention",
    derivation="derivations/attention_backward.md#scaled_dot_product_attention",
)


# -- multi_head_attention ---------------------------------------------------------------------------------------
def multi_head_attention_forward(x, w_qkv, b_qkv, w_out, b_out, key_mask=None, *, n_heads):
    """Multi-head self-attention of a token sequence (timm/MAE layout).

        qkv = x w_qkv + b_qkv, its 3D features split as (3, n_heads, dh), dh = D / n_heads
        o_h = scaled_dot_product_attention(q_h, k_h, v_h, key_mask) for each head h
        out = concat_h(o_h) w_out + b_out

    Shapes: x (B, L, D); w_qkv (D, 3D) input-major (timm's ``qkv.weight`` (3D, D) is its transpose);
    b_qkv (3D,); w_out (D, D) (timm's ``proj.weight`` transposed); b_out (D,); key_mask None or bool
    (B, L), True where a token may be attended -> out (B, L, D).  Feature f = t*D + h*dh + e of qkv is
    component e of head h of the queries (t=0), keys (t=1) or values (t=2).  Either bias may be ``None``
    (its gradient slot is then None).  D % n_heads != 0 is a ValueError.  ``backward`` returns
    (dx, dw_qkv, db_qkv, dw_out, db_out, None); :func:`multi_head_attention_probs` returns the
    (B, n_heads, L, L) weights.

    Reference: Vaswani et al. 2017, arXiv 1706.03762 (3.2.2); Dosovitskiy et al. 2020, arXiv 2010.11929;
    timm timm/models/vision_transformer.py (``Attention``), used by facebookresearch/mae models_mae.py.
    Backward: derivations/attention_backward.md#multi_head_attention.
    """
    V.float_array(x, "x", ndim=3, shape_doc="(B, L, D)")
    n_heads = V.positive_int(n_heads, "n_heads")
    b, n_tok, d = x.shape
    if n_tok == 0:
        raise ValueError(f"x must have shape (B, L, D) with L >= 1 tokens, got shape {x.shape}")
    if d % n_heads:
        raise ValueError(f"n_heads must divide the width D = {d} of x, got n_heads = {n_heads}")
    param(w_qkv, "w_qkv", (d, 3 * d), "(D, 3D)", x)
    if b_qkv is not None:
        param(b_qkv, "b_qkv", (3 * d,), "(3D,)", x)
    param(w_out, "w_out", (d, d), "(D, D)", x)
    if b_out is not None:
        param(b_out, "b_out", (d,), "(D,)", x)
    key_mask = _check_key_mask(key_mask, b, n_tok, "(B, L)")
    dh = d // n_heads
    scale = x.dtype.type(1.0 / np.sqrt(dh))

    qkv = _affine(x, w_qkv, b_qkv)
    # (B, L, 3D) -> (B, L, 3, H, dh): q, k, v are (B, H, L, dh) views of it, a relabelling of entries (AT7)
    # read in place by the GEMMs (each head's (L, dh) slice has unit stride along dh).
    q, k, v = (qkv.reshape(b, n_tok, 3, n_heads, dh)[:, :, t].transpose(0, 2, 1, 3) for t in range(3))
    merged = np.empty((b, n_tok, n_heads, dh), dtype=x.dtype)  # concat of the heads, written by _attend
    o = merged.transpose(0, 2, 1, 3)
    pt = _attend(q, k, v, _mask_bias(key_mask, x.dtype), scale, o)
    merged = merged.reshape(b, n_tok, d)
    out = _affine(merged, w_out, b_out)
    attn = (q, k, v, pt, o, scale)
    return out, (attn, x, w_qkv, b_qkv is not None, merged, w_out, b_out is not None)


def multi_head_attention_backward(cache, grad_out):
    """Output projection, inverse head merge, attention, inverse head split, input projection, in reverse."""
    attn, x, w_qkv, has_bqkv, merged, w_out, has_bout = cache
    q, k, v, pt, o, scale = attn
    b, n_heads, n_tok, dh = q.shape
    d = x.shape[2]
    g = upstream(grad_out, x.shape, x.dtype)
    dmerged, dw_out, db_out = _affine_backward(merged, w_out, has_bout, g)
    do = dmerged.reshape(b, n_tok, n_heads, dh).transpose(0, 2, 1, 3)  # inverse merge: a view
    # dq, dk, dv written straight into their slots of the (B, L, 3, H, dh) gradient of qkv (inverse split)
    dqkv = np.empty((b, n_tok, 3, n_heads, dh), dtype=x.dtype)
    dq, dk, dv = (dqkv[:, :, t].transpose(0, 2, 1, 3) for t in range(3))
    _attend_backward(q, k, v, pt, o, do, scale, dq, dk, dv)
    dx, dw_qkv, db_qkv = _affine_backward(x, w_qkv, has_bqkv, dqkv.reshape(b, n_tok, 3 * d))
    return dx, dw_qkv, db_qkv, dw_out, db_out, None


def multi_head_attention_probs(cache):
    """The softmax weights (B, n_heads, L, L) of every head that a forward pass computed (a copy)."""
    return attention_probs(cache[0])


def _mha_example(rng, dtype=np.float64):
    n_heads, dh = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    b, n_tok, d = int(rng.integers(1, 3)), int(rng.integers(1, 4)), n_heads * dh
    x = rng.standard_normal((b, n_tok, d)).astype(dtype)
    w_qkv = (rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(dtype)
    b_qkv = (0.5 * rng.standard_normal(3 * d)).astype(dtype)
    w_out = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    b_out = (0.5 * rng.standard_normal(d)).astype(dtype)
    return (x, w_qkv, b_qkv, w_out, b_out, _random_key_mask(rng, b, n_tok)), {"n_heads": n_heads}


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
