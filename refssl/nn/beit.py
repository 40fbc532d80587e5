"""BEiT and BEiT v2: masked image modelling with discrete visual tokens as targets.

BEiT (Bao et al. 2021, arXiv 2106.08254; microsoft/unilm ``beit/modeling_pretrain.py``,
``beit/masking_generator.py``): the patch embeddings of the masked positions are replaced by one learned
mask token, the ViT runs over all patches (+ CLS), and a linear LM head at the masked positions only
predicts each patch's token; loss = mean cross-entropy over the masked patches of the batch (registered
``masked_token_ce``).  The official targets come from the frozen DALL-E dVAE, which cannot be fetched here:
:class:`PatchKMeansTokenizer` is refssl's documented substitute, a k-means codebook of standardised pixel
patches (a token = the nearest centroid), trained on the images of the experiment.

BEiT v2 (Peng et al. 2022, arXiv 2208.06366; ``beit2/modeling_pretrain.py``, ``beit2/modeling_vqkd.py``,
``beit2/norm_ema_quantizer.py``): targets from a VQ-KD tokenizer (:class:`VQKD`) trained to reconstruct a
frozen teacher's patch features, and a second, patch-aggregation head: the last layer's CLS token
concatenated with the patch tokens of an early layer, through ``head_layers`` extra blocks, the shared
final norm and the shared LM head; the two cross-entropies are summed.
"""

from __future__ import annotations

import numpy as np

from .. import masking, state as st
from ..clustering import kmeans
from ..ops import masked_modelling as mm
from ..ops import reconstruction
from .io import prefixed, subdict
from .transformer import (TransformerStack, ViT, _lin, _lin_backward, _ln, _ln_backward, _ln_init,
                          sincos_pos_embed_2d, xavier_uniform)

__all__ = ["BEiT", "BEiTv2", "PatchKMeansTokenizer", "VQKD"]


def _head_ce(params, h_all, mask, targets):
    """LM head on the masked rows of h_all (N, L, D) -> (mean CE over them, cache)."""
    h = h_all[mask]  # (M, D): the head is applied at the masked positions only, as in the official code
    logits, c_head = _lin(params, "head", h)
    m = h.shape[0]
    value, c_ce = mm.masked_token_ce_forward(logits[None], targets[mask][None], np.ones((1, m), bool))
    return value, (c_head, c_ce)


def _head_ce_backward(cache, mask, shape, dtype, grads):
    """Gradient of :func:`_head_ce` w.r.t. h_all (zero at unmasked positions); head grads summed into grads."""
    c_head, c_ce = cache
    dlogits = mm.masked_token_ce_backward(c_ce, 1.0)[0][0]
    g = {}
    dh = _lin_backward(c_head, dlogits, "head", g)
    for k, v in g.items():
        grads[k] = grads[k] + v if k in grads else v
    d_all = np.zeros(shape, dtype)
    d_all[mask] = dh
    return d_all


def _check_mask_targets(mask, targets, n, length, vocab):
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (n, length):
        raise ValueError(f"mask must be a bool array of shape ({n}, {length}), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {getattr(mask, 'shape', '')}")
    if not isinstance(targets, np.ndarray) or targets.dtype.kind not in "iu" or targets.shape != (n, length):
        raise ValueError(f"targets must be an integer array of shape ({n}, {length}), got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {getattr(targets, 'shape', '')}")
    if targets.size and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab}), got range "
                         f"[{targets.min()}, {targets.max()}]")


class BEiT:
    """BEiT pretraining model: ViT (``enc.*``, learned absolute positions), ``mask_token`` (D,), LM head
    ``head.*`` (D, vocab)."""

    def __init__(self, *, image_size=32, patch=4, in_channels=3, dim=128, depth=4, n_heads=4, mlp_ratio=4.0,
                 vocab_size=64):
        self.encoder = ViT(image_size=image_size, patch=patch, in_channels=in_channels, dim=dim, depth=depth,
                           n_heads=n_heads, mlp_ratio=mlp_ratio, pos="learned", pool="mean")
        self.vocab_size = int(vocab_size)

    @property
    def grid(self):
        return (self.encoder.grid, self.encoder.grid)

    def init(self, rng, dtype=np.float32) -> dict:
        d, v = self.encoder.dim, self.vocab_size
        p = prefixed(self.encoder.init(rng, dtype)[0], "enc")
        p["mask_token"] = (0.02 * rng.standard_normal(d)).astype(dtype)
        p["head.w"], p["head.b"] = xavier_uniform(rng, d, v, (d, v), dtype), np.zeros(v, dtype)
        return p

    def draw_mask(self, n, rng):
        """Blockwise masks (N, L) bool with BEiT's rules scaled to this patch grid."""
        g = self.grid
        return masking.block_masking(n, g, masking.beit_mask_count(g), rng,
                                     min_num_patches=masking.beit_min_block(g))

    def _trunk(self, params, images, mask):
        """Masked input through the ViT: (final normed tokens, block outputs, caches)."""
        enc, pe = self.encoder, subdict(params, "enc")
        x, c_emb = enc.embed_patches(pe, images)
        n, length, _ = x.shape
        w = mask[..., None].astype(x.dtype)
        x = x * (1 - w) + params["mask_token"] * w
        pos = enc.pos_embed(pe, x.dtype)
        y, outs, c_run = enc.run_blocks(pe, enc.prepend_cls(pe, x + pos[1:], pos[0]))
        return y, outs, (c_emb, c_run, w)

    def _trunk_backward(self, cache, dy, grads, *, extra=None):
        c_emb, c_run, w = cache
        enc = self.encoder
        g = {}
        dx = enc.run_blocks_backward(c_run, dy, g, extra=extra)
        g["cls"] = dx[:, 0].sum(axis=0)
        g["pos"] = dx.sum(axis=0)
        dxp = dx[:, 1:]
        grads["mask_token"] = np.sum(dxp * w, axis=(0, 1))
        enc.embed_patches_backward(c_emb, dxp * (1 - w), g)
        grads.update(prefixed(g, "enc"))

    def loss(self, params, images, targets, mask):
        """Mean cross-entropy of the masked patches' tokens.  targets (N, L) int, mask (N, L) bool."""
        n, length = len(images), self.encoder.n_patches
        _check_mask_targets(mask, targets, n, length, self.vocab_size)
        y, _, c_trunk = self._trunk(params, images, mask)
        value, c_head = _head_ce(params, y[:, 1:], mask, targets)
        return value, (c_trunk, c_head, mask, y.shape)

    def backward(self, cache) -> dict:
        c_trunk, c_head, mask, shape = cache
        grads = {}
        dt = c_trunk[2].dtype
        dpatch = _head_ce_backward(c_head, mask, (shape[0], shape[1] - 1, shape[2]), dt, grads)
        dy = np.zeros(shape, dt)
        dy[:, 1:] = dpatch
        self._trunk_backward(c_trunk, dy, grads)
        return grads

    def loss_and_grads(self, params, images, targets, mask):
        value, cache = self.loss(params, images, targets, mask)
        return float(value), self.backward(cache)

    def features(self, params, images, *, pool="mean", batch_size=512):
        """Encoder features of full images (no mask token): mean patch token or CLS (N, D)."""
        return self.encoder.features(subdict(params, "enc"), images, pool=pool, batch_size=batch_size)

    def predict_tokens(self, params, images, mask):
        """Argmax token at every patch (N, L) given the masked input (accuracy on masked positions)."""
        y, _, _ = self._trunk(params, images, mask)
        return np.argmax(_lin(params, "head", y[:, 1:])[0], axis=-1)


class BEiTv2(BEiT):
    """BEiT v2 pretraining model: BEiT plus the patch-aggregation head (``agg.*`` blocks).

    The aggregation branch (``beit2/modeling_pretrain.py``) concatenates the **last** block's CLS output
    (before the final norm) with the patch tokens after block ``early_layers``, runs ``head_layers`` extra
    blocks, and applies the shared final norm and the shared LM head; loss = CE(final) + CE(aggregation).
    """

    def __init__(self, *, early_layers=None, head_layers=2, **kw):
        super().__init__(**kw)
        depth = self.encoder.depth
        self.early_layers = depth // 2 if early_layers is None else int(early_layers)
        if not 1 <= self.early_layers <= depth:
            raise ValueError(f"early_layers must be in [1, {depth}], got {early_layers}")
        enc = self.encoder
        self.agg = TransformerStack(enc.dim, head_layers, enc.n_heads, enc.stack.blocks[0].hidden / enc.dim)

    def init(self, rng, dtype=np.float32) -> dict:
        p = super().init(rng, dtype)
        p.update(prefixed(self.agg.init(rng, dtype)[0], "agg"))
        return p

    def loss(self, params, images, targets, mask):
        n, length = len(images), self.encoder.n_patches
        _check_mask_targets(mask, targets, n, length, self.vocab_size)
        y, outs, c_trunk = self._trunk(params, images, mask)
        ce1, c_head1 = _head_ce(params, y[:, 1:], mask, targets)
        xa = np.concatenate([outs[-1][:, :1], outs[self.early_layers - 1][:, 1:]], axis=1)
        oa, c_agg = self.agg.forward_outputs(subdict(params, "agg"), xa)
        ya, c_norm = _ln(params, "enc.norm", oa[-1] if oa else xa)
        ce2, c_head2 = _head_ce(params, ya[:, 1:], mask, targets)
        value = ce1 + ce2
        return value, (c_trunk, c_head1, c_head2, c_agg, c_norm, mask, y.shape, float(ce1), float(ce2))

    def backward(self, cache) -> dict:
        c_trunk, c_head1, c_head2, c_agg, c_norm, mask, shape, _, _ = cache
        grads = {}
        dt = c_trunk[2].dtype
        pshape = (shape[0], shape[1] - 1, shape[2])
        # aggregation branch: shared norm and head, gradients summed with the main branch's
        dya = np.zeros(shape, dt)
        dya[:, 1:] = _head_ce_backward(c_head2, mask, pshape, dt, grads)
        g_norm = {}
        dxa = _ln_backward(c_norm, dya, "enc.norm", g_norm)
        dxa, g_agg = self.agg.backward(c_agg, dxa)
        grads.update(prefixed(g_agg, "agg"))
        d_last = np.zeros(shape, dt)
        d_last[:, :1] = dxa[:, :1]
        d_early = np.zeros(shape, dt)
        d_early[:, 1:] = dxa[:, 1:]
        extra = {self.encoder.depth - 1: d_last}
        e = self.early_layers - 1
        extra[e] = extra[e] + d_early if e in extra else d_early
        # main branch
        dy = np.zeros(shape, dt)
        dy[:, 1:] = _head_ce_backward(c_head1, mask, pshape, dt, grads)
        self._trunk_backward(c_trunk, dy, grads, extra=extra)
        for k, v in g_norm.items():
            grads[k] = grads[k] + v
        return grads


# -- tokenizers ----------------------------------------------------------------------------------------

class PatchKMeansTokenizer:
    """refssl's substitute for BEiT's DALL-E dVAE: a k-means codebook of per-patch standardised pixels.

    ``fit`` runs k-means (k-means++, Lloyd) on patches sampled from training images, each patch
    standardised like MAE's ``norm_pix`` target but with a floor on the standard deviation (flat
    background patches stay near zero instead of amplifying noise).  ``encode`` maps every patch of an
    image to its nearest centroid: tokens (N, L) int64.
    """

    def __init__(self, *, patch=4, vocab_size=64, std_floor=0.05):
        self.patch, self.vocab_size, self.std_floor = int(patch), int(vocab_size), float(std_floor)
        self.centroids = None

    def _features(self, images):
        p, _ = mm.patchify_forward(np.asarray(images, dtype=np.float64), patch=self.patch)
        mu = p.mean(axis=-1, keepdims=True)
        sd = p.std(axis=-1, keepdims=True)
        # the patch mean is kept as one extra feature: colour is the cue a patch token must carry
        return np.concatenate([(p - mu) / np.maximum(sd, self.std_floor), 4 * mu], axis=-1)

    def fit(self, images, rng, *, max_patches=20000):
        f = self._features(images)
        f = f.reshape(-1, f.shape[-1])
        if len(f) > max_patches:
            f = f[rng.choice(len(f), max_patches, replace=False)]
        self.centroids = kmeans(f, self.vocab_size, rng, n_init=1, max_iter=25).centroids
        return self

    def encode(self, images):
        if self.centroids is None:
            raise ValueError("the tokenizer is not fitted: call fit(images, rng) first")
        f = self._features(images)
        c = self.centroids
        d = (f ** 2).sum(-1, keepdims=True) - 2 * f @ c.T + (c ** 2).sum(-1)
        return np.argmin(d, axis=-1).astype(np.int64)


class VQKD:
    """Vector-quantised knowledge distillation tokenizer (BEiT v2), small.

    encoder: ViT (``enc.*``, fixed sin-cos positions) -> patch tokens -> linear ``enc_task`` to the code
    width (the official encoder task layer is Linear-Tanh-Linear; one linear map here) -> registered
    ``vector_quantize`` (cosine nearest code, straight-through) -> decoder: linear ``dec_embed``, fixed
    sin-cos positions, ``dec.*`` blocks, norm ``dec_norm``, linear ``dec_task`` to the teacher width ->
    registered ``cosine_distill`` against the frozen teacher's patch features.

        L = mean_rows(1 - cos(dec(z_q), t)) + beta * mean((sg(z_q) - z_hat)^2)

    The codebook (K, code_dim) and its EMA cluster sizes are state, not parameters: after each optimiser
    step :meth:`update_codebook` applies :func:`refssl.state.vq_ema_update` (decay 0.99, normalised
    assigned means, dead codes re-seeded from the batch).
    """

    def __init__(self, *, image_size=32, patch=4, in_channels=3, dim=64, depth=2, n_heads=4, code_dim=16,
                 n_codes=64, dec_depth=1, teacher_dim=64, beta=1.0, mlp_ratio=4.0):
        self.encoder = ViT(image_size=image_size, patch=patch, in_channels=in_channels, dim=dim, depth=depth,
                           n_heads=n_heads, mlp_ratio=mlp_ratio, pos="sincos", pool="mean")
        self.decoder = TransformerStack(dim, dec_depth, n_heads, mlp_ratio)
        self.code_dim, self.n_codes, self.teacher_dim = int(code_dim), int(n_codes), int(teacher_dim)
        self.beta = float(beta)
        g = self.encoder.grid
        self._dec_pos = sincos_pos_embed_2d(dim, g, g, cls_token=False)

    def init(self, rng, dtype=np.float32):
        """(params, state) with state = {"codebook": (K, code_dim) unit rows, "cluster_size": (K,)}."""
        d, c, t = self.encoder.dim, self.code_dim, self.teacher_dim
        p = prefixed(self.encoder.init(rng, dtype)[0], "enc")
        p["enc_task.w"], p["enc_task.b"] = xavier_uniform(rng, d, c, (d, c), dtype), np.zeros(c, dtype)
        p["dec_embed.w"], p["dec_embed.b"] = xavier_uniform(rng, c, d, (c, d), dtype), np.zeros(d, dtype)
        p.update(prefixed(self.decoder.init(rng, dtype)[0], "dec"))
        p["dec_norm.gamma"], p["dec_norm.beta"] = _ln_init(d, dtype)
        p["dec_task.w"], p["dec_task.b"] = xavier_uniform(rng, d, t, (d, t), dtype), np.zeros(t, dtype)
        cb = rng.standard_normal((self.n_codes, c))
        cb /= np.linalg.norm(cb, axis=1, keepdims=True)
        return p, {"codebook": cb.astype(dtype), "cluster_size": np.zeros(self.n_codes, dtype)}

    def _encode(self, params, images):
        enc, pe = self.encoder, subdict(params, "enc")
        x, c_emb = enc.embed_patches(pe, images)
        pos = enc.pos_embed(pe, x.dtype)
        y, _, c_run = enc.run_blocks(pe, enc.prepend_cls(pe, x + pos[1:], pos[0]))
        z, c_task = _lin(params, "enc_task", y[:, 1:])
        return z, (c_emb, c_run, c_task, y.shape)

    def tokenize(self, params, state, images, *, batch_size=512):
        """Code index of every patch (N, L) int64."""
        out = []
        for s in range(0, len(images), batch_size):
            z, _ = self._encode(params, images[s:s + batch_size])
            out.append(mm.nearest_code(z, state["codebook"]))
        return np.concatenate(out, axis=0)

    def loss(self, params, state, images, teacher):
        """teacher (N, L, teacher_dim): the frozen teacher's patch features (stop-gradient)."""
        z, c_enc = self._encode(params, images)
        zq, c_vq = mm.vector_quantize_forward(z, state["codebook"])
        zhat = mm.vector_quantize_normalized_input(c_vq)
        idx = mm.vector_quantize_indices(c_vq)
        cb = state["codebook"]
        code = (cb / np.linalg.norm(cb, axis=1, keepdims=True))[idx]  # = z_q's value, as a constant: sg(z_q)
        commit, c_commit = reconstruction.mse_forward(zhat, code)
        u, c_de = _lin(params, "dec_embed", zq)
        u = u + self._dec_pos.astype(u.dtype, copy=False)
        outs, c_blocks = self.decoder.forward_outputs(subdict(params, "dec"), u)
        r, c_norm = _ln(params, "dec_norm", outs[-1] if outs else u)
        rec, c_task = _lin(params, "dec_task", r)
        distill, c_cd = mm.cosine_distill_forward(rec, teacher)
        value = distill + z.dtype.type(self.beta) * commit
        info = {"distill": float(distill), "commit": float(commit),
                "indices": idx, "zhat": zhat}
        return value, (c_enc, c_vq, c_commit, c_de, c_blocks, c_norm, c_task, c_cd, info)

    def backward(self, cache) -> dict:
        c_enc, c_vq, c_commit, c_de, c_blocks, c_norm, c_task, c_cd, _ = cache
        grads = {}
        drec = mm.cosine_distill_backward(c_cd, 1.0)[0]
        dr = _lin_backward(c_task, drec, "dec_task", grads)
        du = _ln_backward(c_norm, dr, "dec_norm", grads)
        du, g = self.decoder.backward(c_blocks, du)
        grads.update(prefixed(g, "dec"))
        dzq = _lin_backward(c_de, du, "dec_embed", grads)
        dzhat = reconstruction.mse_backward(c_commit, self.beta)[0]
        # Straight-through: the gradient reaching z_q is passed to z_hat, where it joins the commitment
        # term's gradient; vector_quantize's backward then applies the L2-normalisation backward.
        dz = mm.vector_quantize_backward(c_vq, dzq + dzhat)[0]
        c_emb, c_run, c_taskenc, yshape = c_enc
        dy = np.zeros(yshape, dz.dtype)
        dy[:, 1:] = _lin_backward(c_taskenc, dz, "enc_task", grads)
        g_enc = {}
        dx = self.encoder.run_blocks_backward(c_run, dy, g_enc)
        g_enc["cls"] = dx[:, 0].sum(axis=0)
        self.encoder.embed_patches_backward(c_emb, dx[:, 1:], g_enc)
        grads.update(prefixed(g_enc, "enc"))
        return grads

    def update_codebook(self, state, cache, rng=None, *, decay=0.99):
        """New state after the EMA codebook update with this forward pass's assignments."""
        info = cache[-1]
        zhat = info["zhat"].reshape(-1, self.code_dim)
        idx = info["indices"].reshape(-1)
        cb, cs, _ = st.vq_ema_update(state["codebook"], state["cluster_size"], zhat, idx, decay=decay, rng=rng)
        return {"codebook": cb, "cluster_size": cs}
