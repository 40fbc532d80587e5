"""Masked autoencoder (He et al. 2021, arXiv 2111.06377; facebookresearch/mae ``models_mae.py``).

    model = MAE(image_size=32, patch=4, dim=128, depth=4, n_heads=4, dec_dim=64, dec_depth=2)
    params = model.init(np.random.default_rng(0))
    loss, cache = model.loss(params, images, rng)          # random masking drawn from rng
    grads = model.backward(cache)                           # keys of params
    feats = model.features(params, images)                  # encoder on full images, for probes

One forward pass (``../shared`` reference §18 and §21):

1. patch embedding of every patch, plus the fixed sin-cos position of the patch;
2. per-sample random masking (:func:`refssl.masking.random_masking`): keep ``floor(L (1 - r))`` patches,
   gather them (registered ``gather_tokens``), prepend the CLS token, run the encoder blocks and its norm;
3. decoder: a linear map to the decoder width, one shared learned mask token appended for every removed
   patch, unshuffle to the patch order (``gather_tokens`` with ``ids_restore``), the decoder's own fixed
   sin-cos positions, its blocks and norm, a linear head to p²C values per patch; CLS dropped;
4. registered ``mae_loss``: mean squared error per patch, averaged over the removed patches only, against
   the patchified image (per-patch standardised with ``norm_pix``).

The backward pass retraces these steps; the only non-op steps are concatenations, slices and the sum of
the mask token's gradient over every position it was copied to.
"""

from __future__ import annotations

import numpy as np

from .. import masking
from ..ops import masked_modelling as mm
from .io import prefixed, subdict
from .transformer import (TransformerStack, ViT, _lin, _lin_backward, _ln, _ln_backward, _ln_init,
                          sincos_pos_embed_2d, xavier_uniform)

__all__ = ["MAE"]


class MAE:
    """Masked autoencoder with a ViT encoder (``enc.*``) and a light transformer decoder (``dec.*``)."""

    def __init__(self, *, image_size=32, patch=4, in_channels=3, dim=128, depth=4, n_heads=4,
                 dec_dim=64, dec_depth=2, dec_heads=4, mlp_ratio=4.0, mask_ratio=0.75, norm_pix=False):
        self.encoder = ViT(image_size=image_size, patch=patch, in_channels=in_channels, dim=dim, depth=depth,
                           n_heads=n_heads, mlp_ratio=mlp_ratio, pos="sincos", pool="cls")
        self.decoder = TransformerStack(dec_dim, dec_depth, dec_heads, mlp_ratio)
        self.dec_dim = int(dec_dim)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not isinstance(norm_pix, (bool, np.bool_)):
            raise TypeError(f"norm_pix must be a bool, got {type(norm_pix).__name__}")
        self.mask_ratio, self.norm_pix = float(mask_ratio), bool(norm_pix)
        g = self.encoder.grid
        self._dec_pos = sincos_pos_embed_2d(self.dec_dim, g, g)

    @property
    def n_patches(self):
        return self.encoder.n_patches

    def init(self, rng, dtype=np.float32) -> dict:
        enc = self.encoder
        d, dd, pd = enc.dim, self.dec_dim, enc.patch_dim
        p = prefixed(enc.init(rng, dtype)[0], "enc")
        p["dec.embed.w"], p["dec.embed.b"] = xavier_uniform(rng, d, dd, (d, dd), dtype), np.zeros(dd, dtype)
        p["dec.mask_token"] = (0.02 * rng.standard_normal(dd)).astype(dtype)
        p.update(prefixed(self.decoder.init(rng, dtype)[0], "dec.blocks"))
        p["dec.norm.gamma"], p["dec.norm.beta"] = _ln_init(dd, dtype)
        p["dec.pred.w"], p["dec.pred.b"] = xavier_uniform(rng, dd, pd, (dd, pd), dtype), np.zeros(pd, dtype)
        return p

    def draw_masking(self, n, rng, mask_ratio=None):
        """(ids_keep, mask, ids_restore) for a batch of n images (official per-sample random masking)."""
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        return masking.random_masking(n, self.n_patches, r, rng)

    # -- forward / backward --
    def loss(self, params, images, rng=None, *, masks=None, mask_ratio=None):
        """Scalar loss and cache.  ``masks`` = (ids_keep, mask, ids_restore) fixes the masking (tests);
        otherwise it is drawn from ``rng``."""
        enc, pe = self.encoder, subdict(params, "enc")
        pdec = subdict(params, "dec")
        x, c_emb = enc.embed_patches(pe, images)
        n, length, _ = x.shape
        dt = x.dtype
        if masks is None:
            if rng is None:
                raise ValueError("pass rng (to draw the random masking) or masks=(ids_keep, mask, ids_restore)")
            masks = self.draw_masking(n, rng, mask_ratio)
        ids_keep, mask, ids_restore = masks
        keep = ids_keep.shape[1]
        pos = enc.pos_embed(pe, dt)
        xv, c_g1 = mm.gather_tokens_forward(x + pos[1:], ids_keep)
        lat, _, c_run = enc.run_blocks(pe, enc.prepend_cls(pe, xv, pos[0]))

        y, c_de = _lin(pdec, "embed", lat)
        tokens = np.concatenate(
            [y[:, 1:], np.broadcast_to(pdec["mask_token"], (n, length - keep, self.dec_dim))], axis=1)
        unshuffled, c_g2 = mm.gather_tokens_forward(tokens, ids_restore)
        yd = np.concatenate([y[:, :1], unshuffled], axis=1) + self._dec_pos.astype(dt, copy=False)
        outs, c_blocks = self.decoder.forward_outputs(subdict(pdec, "blocks"), yd)
        z, c_norm = _ln(pdec, "norm", outs[-1] if outs else yd)
        p, c_pred = _lin(pdec, "pred", z[:, 1:])
        target, _ = mm.patchify_forward(images, patch=enc.patch)
        value, c_loss = mm.mae_loss_forward(p, target, np.asarray(mask, dtype=dt), norm_pix=self.norm_pix)
        cache = (c_emb, c_g1, c_run, c_de, c_g2, c_blocks, c_norm, c_pred, c_loss, keep, lat.shape, p)
        return value, cache

    def backward(self, cache) -> dict:
        """Gradients of the loss with respect to every parameter (keys of ``params``)."""
        c_emb, c_g1, c_run, c_de, c_g2, c_blocks, c_norm, c_pred, c_loss, keep, lat_shape, _ = cache
        enc = self.encoder
        g_enc, g_dec = {}, {}
        dp = mm.mae_loss_backward(c_loss, 1.0)[0]
        dz_patches = _lin_backward(c_pred, dp, "pred", g_dec)
        dz = np.zeros(dz_patches.shape[:1] + (dz_patches.shape[1] + 1,) + dz_patches.shape[2:], dp.dtype)
        dz[:, 1:] = dz_patches  # the CLS output is dropped: no gradient
        dyd = _ln_backward(c_norm, dz, "norm", g_dec)
        dyd, g = self.decoder.backward(c_blocks, dyd)
        g_dec.update(prefixed(g, "blocks"))
        dtokens = mm.gather_tokens_backward(c_g2, dyd[:, 1:])[0]
        g_dec["mask_token"] = dtokens[:, keep:].sum(axis=(0, 1))
        dy = np.empty(lat_shape[:2] + (dtokens.shape[-1],), dp.dtype)
        dy[:, :1] = dyd[:, :1]
        dy[:, 1:] = dtokens[:, :keep]
        dlat = _lin_backward(c_de, dy, "embed", g_dec)
        dxc = enc.run_blocks_backward(c_run, dlat, g_enc)
        g_enc["cls"] = dxc[:, 0].sum(axis=0)
        dx = mm.gather_tokens_backward(c_g1, dxc[:, 1:])[0]
        enc.embed_patches_backward(c_emb, dx, g_enc)
        return {**prefixed(g_enc, "enc"), **prefixed(g_dec, "dec")}

    def loss_and_grads(self, params, images, rng):
        value, cache = self.loss(params, images, rng)
        return float(value), self.backward(cache)

    # -- evaluation --
    def features(self, params, images, *, pool="mean", batch_size=512):
        """Encoder features of full (unmasked) images: mean of the patch tokens or the CLS token (N, D)."""
        return self.encoder.features(subdict(params, "enc"), images, pool=pool, batch_size=batch_size)

    def reconstruct(self, params, images, rng, *, mask_ratio=None):
        """(reconstructed images with the visible patches pasted back, mask images with 1 = removed).

        With ``norm_pix`` the prediction is un-normalised with each target patch's own mean and standard
        deviation before display (mae issue #190: shown raw, it looks wrong)."""
        enc = self.encoder
        n = len(images)
        masks = self.draw_masking(n, rng, mask_ratio)
        _, cache = self.loss(params, images, masks=masks)
        p = cache[-1]  # the decoder's per-patch prediction (N, L, P)
        target, _ = mm.patchify_forward(images, patch=enc.patch)
        if self.norm_pix:
            _, mean, std = mm.norm_pix_target(target)
            p = p * std + mean
        m = masks[1][..., None].astype(images.dtype)
        shown = target * (1 - m) + p * m
        grid = (enc.grid, enc.grid)
        c = enc.in_channels
        recon = mm.unpatchify(shown, patch=enc.patch, channels=c, grid=grid)
        mask_img = mm.unpatchify(np.broadcast_to(m, target.shape).copy(), patch=enc.patch, channels=c, grid=grid)
        return recon, mask_img
