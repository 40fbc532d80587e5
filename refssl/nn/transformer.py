"""Transformer modules: multi-head self-attention, the pre-norm block, a stack of blocks, and the Vision
Transformer encoder used by MAE and BEiT.

Every layer's backward is written beside its forward (llm.c's layout), each one a composition of the
registered ops ``linear``, ``layer_norm``, ``gelu``, ``multi_head_attention`` and ``patchify``: the
modules add only residual sums, concatenations and slices, whose backward passes are sums and slices.

Conventions (``../shared`` reference §21; timm ``vision_transformer.py``, facebookresearch/mae
``models_mae.py``, ``util/pos_embed.py``):

* pre-norm block: ``x <- x + Attn(LN1(x))``, ``x <- x + MLP(LN2(x))``; MLP = Linear -> exact GELU -> Linear
  (ratio 4); LayerNorm eps 1e-6; qkv with bias, its 3D outputs split as (3, heads, D/heads);
* patch embedding: a linear map of each patch flattened in the MAE ``patchify`` order (row, column,
  channel). timm's conv weight ``(D, C, p, p)`` flattens as (channel, row, column): a port loads it as
  ``w = conv_w.permute(2, 3, 1, 0).reshape(p*p*C, D)``;
* positions: fixed 2-D sin-cos (:func:`sincos_pos_embed_2d`, MAE) or learned (BEiT's absolute option);
* initialisation (MAE ``initialize_weights``): xavier-uniform for every linear weight (the patch
  embedding viewed as a (D, p²C) matrix, qkv as a (3D, D) one), biases 0, LayerNorm 1/0, CLS token
  N(0, 0.02²); learned position embeddings truncated N(0, 0.02²).

Parameters are flat dicts with dotted names (``"blocks.0.attn.qkv.w"``); the last component ``w``/``b``/
``gamma``/``beta`` lets :func:`refssl.optim.bias_or_norm` exclude biases and norms from weight decay, and
:func:`no_decay` adds the tokens and position embeddings (timm's ``no_weight_decay`` list).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import validation as V
from ..ops import activations, attention, linear, masked_modelling, norm_layers
from .io import prefixed, subdict
from .layers import Module

__all__ = ["sincos_pos_embed_2d", "xavier_uniform", "MultiHeadAttention", "TransformerBlock",
           "TransformerStack", "ViT", "no_decay", "LN_EPS"]

LN_EPS = 1e-6  # MAE and BEiT build their blocks with LayerNorm(eps=1e-6)


def xavier_uniform(rng, fan_in: int, fan_out: int, shape, dtype):
    """Glorot & Bengio 2010 uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(dtype)


def _trunc_normal(rng, std, shape, dtype):
    """N(0, std²) truncated at +-2 std (timm's ``trunc_normal_(std=.02)`` with its default bounds
    a=-2, b=2 is effectively untruncated for std 0.02; here the cut is at 2 std, as BEiT intends)."""
    x = rng.standard_normal(shape)
    while True:
        bad = np.abs(x) > 2
        if not bad.any():
            break
        x[bad] = rng.standard_normal(int(bad.sum()))
    return (std * x).astype(dtype)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, *, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of MAE (``util/pos_embed.py``), float64 ((1 +) h*w, dim).

    Patches are numbered row-major. The first dim/2 channels encode the patch's **column**, the last dim/2
    its row (MAE's ``meshgrid(grid_w, grid_h)`` puts the column first); each half is
    ``[sin(w_k t)]_k || [cos(w_k t)]_k`` with ``w_k = 10000^(-k / (dim/4))``, k = 0 .. dim/4 - 1.  The CLS
    row (first, when ``cls_token``) is zero.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
    rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)

    def half(t):
        ang = t[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    emb = np.concatenate([half(cols.astype(np.float64)), half(rows.astype(np.float64))], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


def no_decay(name: str) -> bool:
    """Parameters kept out of weight decay: biases, norm affine parameters, tokens, position embeddings."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in {"b", "gamma", "beta", "cls", "mask_token", "pos"}


# -- attention ---------------------------------------------------------------------------------------

class MultiHeadAttention(Module):
    """Self-attention over tokens x (B, L, D) with the registered ``multi_head_attention`` op.

    Params ``qkv.w`` (D, 3D) input-major (timm's ``qkv.weight`` transposed), ``qkv.b`` (3D,), ``proj.w``
    (D, D), ``proj.b`` (D,).  ``key_mask`` (B, L) bool marks the keys that may be attended (padding).
    """

    def __init__(self, dim: int, n_heads: int):
        self.dim, self.n_heads = int(dim), int(n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")

    def init(self, rng, dtype=np.float32):
        d = self.dim
        return {"qkv.w": xavier_uniform(rng, d, 3 * d, (d, 3 * d), dtype), "qkv.b": np.zeros(3 * d, dtype),
                "proj.w": xavier_uniform(rng, d, d, (d, d), dtype), "proj.b": np.zeros(d, dtype)}, {}

    def forward(self, params, state, x, *, train=True, key_mask=None):
        out, cache = attention.multi_head_attention_forward(
            x, params["qkv.w"], params["qkv.b"], params["proj.w"], params["proj.b"], key_mask,
            n_heads=self.n_heads)
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        dx, dwq, dbq, dwo, dbo = attention.multi_head_attention_backward(cache, dout)[:5]
        return dx, {"qkv.w": dwq, "qkv.b": dbq, "proj.w": dwo, "proj.b": dbo}


def _ln(params, prefix, x):
    return norm_layers.layer_norm_forward(x, params[prefix + ".gamma"], params[prefix + ".beta"], eps=LN_EPS)


def _ln_backward(cache, d, prefix, grads):
    dx, dg, db = norm_layers.layer_norm_backward(cache, d)
    grads[prefix + ".gamma"], grads[prefix + ".beta"] = dg, db
    return dx


def _lin(params, prefix, x):
    return linear.linear_forward(x, params[prefix + ".w"], params[prefix + ".b"])


def _lin_backward(cache, d, prefix, grads):
    dx, dw, db = linear.linear_backward(cache, d)
    grads[prefix + ".w"], grads[prefix + ".b"] = dw, db
    return dx


def _ln_init(d, dtype):
    return np.ones(d, dtype), np.zeros(d, dtype)


def _norm_into_linear(params, norm, lin):
    """(w', b') = (diag(gamma) w, beta w + b): the layer norm ``norm``'s scale and shift applied through the
    linear map ``lin`` that reads its output, so that (x-hat gamma + beta) w + b = x-hat w' + b' (AT9)."""
    gamma, beta, w = params[norm + ".gamma"], params[norm + ".beta"], params[lin + ".w"]
    return gamma[:, None] * w, beta @ w + params[lin + ".b"]


def _norm_into_linear_backward(params, norm, lin, dw_f, db_f, grads):
    """The gradients of gamma, beta, w and b from those of the folded (w', b') (AT9):
    dw = gamma dw' + beta db'^T (outer), db = db', dgamma_d = sum_j w_dj dw'_dj, dbeta = w db'."""
    gamma, beta, w = params[norm + ".gamma"], params[norm + ".beta"], params[lin + ".w"]
    grads[lin + ".w"] = gamma[:, None] * dw_f + beta[:, None] * db_f
    grads[lin + ".b"] = db_f
    grads[norm + ".gamma"] = np.einsum("dj,dj->d", w, dw_f)
    grads[norm + ".beta"] = w @ db_f


# -- block -------------------------------------------------------------------------------------------

class BlockCache(NamedTuple):
    """What :meth:`TransformerBlock.backward` needs: the op caches, and the shape and dtype of the block's
    input (= its output), against which a stack checks the upstream gradient."""
    ln1: tuple
    attn: tuple
    ln2: tuple
    fc1: tuple
    act: tuple
    fc2: tuple
    shape: tuple
    dtype: np.dtype
    params: dict  # the block's parameters, for the gradients of the folded layer norms


class TransformerBlock(Module):
    """Pre-norm transformer block (ViT, MAE, BEiT; BERT-style encoders use the same block here).

        h = x + Attn(LN1(x)),    out = h + fc2(GELU(fc1(LN2(h))))

    Shapes: x (B, L, D) -> out (B, L, D).  Params ``norm1.*``, ``attn.*``, ``norm2.*``, ``fc1.*``
    (D, r D), ``fc2.*`` (r D, D).

    Each layer norm's scale and shift are applied through the linear map that reads it (qkv, fc1):
    ``layer_norm`` runs without them and the map gets w' = diag(gamma) w, b' = beta w + b
    (derivations/attention_backward.md, AT9).  The function is the same; the two passes over the tokens
    that scale and shift them, and three in backward, are saved, and the rounding differs in the last bits
    (bit for bit the same while gamma = 1 and beta = 0, as at initialisation).
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0):
        self.dim, self.n_heads = int(dim), int(n_heads)
        self.hidden = int(round(dim * mlp_ratio))
        self.attn = MultiHeadAttention(dim, n_heads)

    def init(self, rng, dtype=np.float32):
        d, hdn = self.dim, self.hidden
        p = {}
        p["norm1.gamma"], p["norm1.beta"] = _ln_init(d, dtype)
        p.update(prefixed(self.attn.init(rng, dtype)[0], "attn"))
        p["norm2.gamma"], p["norm2.beta"] = _ln_init(d, dtype)
        p["fc1.w"], p["fc1.b"] = xavier_uniform(rng, d, hdn, (d, hdn), dtype), np.zeros(hdn, dtype)
        p["fc2.w"], p["fc2.b"] = xavier_uniform(rng, hdn, d, (hdn, d), dtype), np.zeros(d, dtype)
        return p, {}

    def forward(self, params, state, x, *, train=True, key_mask=None):
        x_hat, c_ln1 = norm_layers.layer_norm_forward(x, None, None, eps=LN_EPS)
        p_attn = subdict(params, "attn")
        p_attn["qkv.w"], p_attn["qkv.b"] = _norm_into_linear(params, "norm1", "attn.qkv")
        a, c_attn, _ = self.attn.forward(p_attn, {}, x_hat, key_mask=key_mask)
        # The residual sums accumulate into the fresh op outputs (neither op keeps its output in its
        # cache): no new (B, L, D) array per sum.
        h = np.add(a, x, out=a)
        h_hat, c_ln2 = norm_layers.layer_norm_forward(h, None, None, eps=LN_EPS)
        u, c_fc1 = linear.linear_forward(h_hat, *_norm_into_linear(params, "norm2", "fc1"))
        v, c_act = activations.gelu_forward(u)
        m, c_fc2 = _lin(params, "fc2", v)
        cache = BlockCache(c_ln1, c_attn, c_ln2, c_fc1, c_act, c_fc2, x.shape, x.dtype, params)
        return np.add(m, h, out=m), cache, state

    def backward(self, cache, dout, *, need_dx=True):
        grads, p = {}, cache.params
        # out = h + m: dout flows both into the MLP branch and straight to h.
        dv = _lin_backward(cache.fc2, dout, "fc2", grads)
        du = activations.gelu_backward(cache.act, dv)[0]
        dh_hat, dw1, db1 = linear.linear_backward(cache.fc1, du)
        _norm_into_linear_backward(p, "norm2", "fc1", dw1, db1, grads)
        dh = norm_layers.layer_norm_backward(cache.ln2, dh_hat)[0]
        dh += dout  # into the fresh gradient array; dout itself is not modified
        dx_hat, g_attn = self.attn.backward(cache.attn, dh)
        _norm_into_linear_backward(p, "norm1", "attn.qkv", g_attn.pop("qkv.w"), g_attn.pop("qkv.b"), grads)
        grads.update(prefixed(g_attn, "attn"))
        dx = norm_layers.layer_norm_backward(cache.ln1, dx_hat)[0]
        dx += dh
        return dx, grads


def _scan_boundary(named_arrays, why: str) -> None:
    """ValueError naming the first array that holds NaN or inf (the checks at a module's boundary)."""
    for name, a in named_arrays:
        if not V.all_finite(a):
            raise ValueError(f"{name} contains NaN or inf ({why})")


class TransformerStack(Module):
    """``depth`` blocks applied in turn; params ``"{i}.*"``.

    ``forward(..., keep=(i, ...))`` also returns, in ``cache``, nothing more than the block caches;
    :meth:`forward_outputs` returns the output of every block (BEiT v2 reads an early layer), and
    :meth:`backward` takes ``extra={i: grad}``: gradients arriving at the output of block ``i`` from
    elsewhere than the next block.
    """

    def __init__(self, dim: int, depth: int, n_heads: int, mlp_ratio: float = 4.0):
        self.depth = int(depth)
        self.blocks = [TransformerBlock(dim, n_heads, mlp_ratio) for _ in range(self.depth)]

    def init(self, rng, dtype=np.float32):
        p = {}
        for i, blk in enumerate(self.blocks):
            p.update(prefixed(blk.init(rng, dtype)[0], str(i)))
        return p, {}

    def forward_outputs(self, params, x, *, key_mask=None):
        """(outputs of every block, caches).

        NaN/inf are checked at the stack's boundary (its input, its parameters, its output; in backward
        the upstream gradients and the input gradient) rather than by each of the ~20 ops per block
        (see :func:`refssl.validation.inputs_scanned_by_caller`).
        """
        V.float_array(x, "x", ndim=3, shape_doc="(B, L, D)")
        _scan_boundary(((f"params[{k!r}]", v) for k, v in params.items()), "the stack's parameters")
        outs, caches = [], []
        with V.inputs_scanned_by_caller():
            for i, blk in enumerate(self.blocks):
                x, c, _ = blk.forward(subdict(params, str(i)), {}, x, key_mask=key_mask)
                outs.append(x)
                caches.append(c)
        if outs:
            _scan_boundary([(f"the output of block {len(outs) - 1}", outs[-1])],
                           "an intermediate overflowed the dtype")
        return outs, caches

    def forward(self, params, state, x, *, train=True, key_mask=None):
        outs, caches = self.forward_outputs(params, x, key_mask=key_mask)
        return (outs[-1] if outs else x), caches, state

    def backward(self, cache, dout, *, need_dx=True, extra=None):
        extra = extra or {}
        if not cache:
            return dout, {}
        shape, dt = cache[-1].shape, cache[-1].dtype  # (B, L, D)
        dout = V.grad_out(dout, shape, dt, name="dout")
        extra = {i: V.grad_out(e, shape, dt, name=f"extra[{i}]") for i, e in extra.items()}
        grads = {}
        with V.inputs_scanned_by_caller():
            for i in range(self.depth - 1, -1, -1):
                if i in extra:
                    dout = dout + extra[i]
                dout, g = self.blocks[i].backward(cache[i], dout)
                grads.update(prefixed(g, str(i)))
        _scan_boundary([("the input gradient", dout)], "an intermediate overflowed the dtype")
        return dout, grads


# -- Vision Transformer ------------------------------------------------------------------------------

class ViT(Module):
    """Vision Transformer encoder: patchify -> linear patch embedding -> [CLS] + positions -> blocks -> LN.

    ``forward(params, state, images)`` maps images (N, C, H, W) to a pooled feature (N, D): the final CLS
    token (``pool="cls"``) or the mean of the final patch tokens (``pool="mean"``), so that a ViT is an
    encoder for the trainer and the probes.  MAE and BEiT use the stages below directly.

    Params: ``patch.w`` (p²C, D), ``patch.b`` (D,), ``cls`` (D,), ``pos`` ((L + 1), D) when
    ``pos="learned"`` (fixed sin-cos otherwise), ``blocks.{i}.*``, ``norm.gamma``, ``norm.beta``.
    """

    def __init__(self, *, image_size=32, patch=4, in_channels=3, dim=128, depth=4, n_heads=4,
                 mlp_ratio=4.0, pos="sincos", pool="cls"):
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by patch={patch}")
        if pos not in ("sincos", "learned"):
            raise ValueError(f"pos must be 'sincos' or 'learned', got {pos!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.image_size, self.patch, self.in_channels = int(image_size), int(patch), int(in_channels)
        self.dim, self.depth, self.n_heads = int(dim), int(depth), int(n_heads)
        self.grid = self.image_size // self.patch
        self.n_patches = self.grid * self.grid
        self.patch_dim = self.patch * self.patch * self.in_channels
        self.pos, self.pool = pos, pool
        self.stack = TransformerStack(dim, depth, n_heads, mlp_ratio)
        self._fixed_pos = sincos_pos_embed_2d(self.dim, self.grid, self.grid) if pos == "sincos" else None

    # -- parameters --
    def init(self, rng, dtype=np.float32):
        d, pd = self.dim, self.patch_dim
        p = {"patch.w": xavier_uniform(rng, pd, d, (pd, d), dtype),
             # MAE's init leaves the conv bias at PyTorch's default U(+-1/sqrt(fan_in)).
             "patch.b": rng.uniform(-1, 1, d).astype(dtype) / np.sqrt(pd).astype(dtype),
             "cls": (0.02 * rng.standard_normal(d)).astype(dtype)}
        if self.pos == "learned":
            p["pos"] = _trunc_normal(rng, 0.02, (self.n_patches + 1, d), dtype)
        p.update(prefixed(self.stack.init(rng, dtype)[0], "blocks"))
        p["norm.gamma"], p["norm.beta"] = _ln_init(d, dtype)
        return p, {}

    def pos_embed(self, params, dtype):
        """((L + 1), D) position embedding, row 0 for the CLS token."""
        if self.pos == "learned":
            return params["pos"]
        return self._fixed_pos.astype(dtype, copy=False)

    # -- stages --
    def embed_patches(self, params, images):
        """images (N, C, H, W) -> patch embeddings (N, L, D) (no positions), cache."""
        if images.ndim != 4 or images.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"images must have shape (N, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got shape {getattr(images, 'shape', None)}")
        patches, _ = masked_modelling.patchify_forward(images, patch=self.patch)
        x, c = _lin(params, "patch", patches)
        return x, c

    def embed_patches_backward(self, cache, d, grads):
        """Parameter gradients of :meth:`embed_patches` into ``grads`` (the images get none, so the
        linear's input gradient is not computed)."""
        _, grads["patch.w"], grads["patch.b"] = linear.linear_backward(cache, d, need_dx=False)

    def prepend_cls(self, params, x, pos0):
        """x (N, K, D) -> (N, K + 1, D) with the CLS token (+ its position row) first."""
        n, _, d = x.shape
        cls = np.broadcast_to((params["cls"] + pos0)[None, None, :], (n, 1, d))
        return np.concatenate([cls, x], axis=1)

    def _tokens_in(self, params, x):
        """Patch embeddings (N, L, D) -> (N, L + 1, D): CLS + its position row first, then x + positions,
        written straight into one array (no concatenation pass)."""
        pos = self.pos_embed(params, x.dtype)
        n, k, d = x.shape
        tok = np.empty((n, k + 1, d), x.dtype)
        np.add(x, pos[1:], out=tok[:, 1:])
        tok[:, 0] = params["cls"] + pos[0]
        return tok

    def run_blocks(self, params, x, *, key_mask=None):
        """Blocks then the final LayerNorm: (N, T, D) -> (normed output, block outputs, cache)."""
        outs, c_blocks = self.stack.forward_outputs(subdict(params, "blocks"), x, key_mask=key_mask)
        y, c_norm = _ln(params, "norm", outs[-1] if outs else x)
        return y, outs, (c_blocks, c_norm)

    def run_blocks_backward(self, cache, dy, grads, *, extra=None):
        c_blocks, c_norm = cache
        d = _ln_backward(c_norm, dy, "norm", grads)
        dx, g = self.stack.backward(c_blocks, d, extra=extra)
        grads.update(prefixed(g, "blocks"))
        return dx

    # -- whole encoder on full images --
    def forward(self, params, state, images, *, train=True):
        x, c_emb = self.embed_patches(params, images)
        y, _, c_run = self.run_blocks(params, self._tokens_in(params, x))
        pooled = y[:, 0] if self.pool == "cls" else y[:, 1:].mean(axis=1)
        return pooled, (c_emb, c_run, y.shape), state

    def backward(self, cache, dout, *, need_dx=False):
        c_emb, c_run, shape = cache
        dy = np.zeros(shape, dout.dtype)
        if self.pool == "cls":
            dy[:, 0] = dout
        else:
            dy[:, 1:] = (dout / dout.dtype.type(shape[1] - 1))[:, None, :]
        grads = {}
        dx = self.run_blocks_backward(c_run, dy, grads)
        grads["cls"] = dx[:, 0].sum(axis=0)
        if self.pos == "learned":
            grads["pos"] = dx.sum(axis=0)
        self.embed_patches_backward(c_emb, dx[:, 1:], grads)
        return None, grads

    def tokens(self, params, images):
        """Final normed tokens (N, L + 1, D) of full images (evaluation; no cache kept)."""
        x, _ = self.embed_patches(params, images)
        return self.run_blocks(params, self._tokens_in(params, x))[0]

    def features(self, params, images, *, pool=None, batch_size=512):
        """Pooled features (N, D) of full images in batches (evaluation): mean of the final patch tokens
        (``pool="mean"``) or the final CLS token (``"cls"``); the module's own pooling by default."""
        pool = self.pool if pool is None else pool
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        out = []
        for s in range(0, len(images), batch_size):
            y = self.tokens(params, images[s:s + batch_size])
            out.append(y[:, 1:].mean(axis=1) if pool == "mean" else y[:, 0])
        return np.concatenate(out, axis=0)
