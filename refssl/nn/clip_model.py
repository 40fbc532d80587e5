"""CLIP dual encoder: an image encoder and a text encoder, each followed by a bias-free linear projection to a
shared embedding, trained with the registered ``clip`` loss and a learnable logit scale.

    model = CLIPModel(ViT(...) or cnn_encoder(...), TextEncoder(...), embed_dim=32)
    params = model.init(np.random.default_rng(0))
    loss, cache = model.loss(params, images, ids, attn_mask)     # row i of images matches caption i
    grads = model.backward(cache)                                # keys of params, incl. "logit_scale"
    params = model.after_step(params)                            # clamp s to [0, ln 100] after each step

Conventions (``../shared`` reference §3; Radford et al. 2021, arXiv 2103.00020; openai/CLIP ``clip/model.py``;
mlfoundations/open_clip ``src/open_clip/loss.py`` and ``src/open_clip_train/train.py``):

* embeddings ``e_I = f_I(image) W_I``, ``e_T = f_T(text) W_T`` with ``W`` of shape (width, embed_dim), no bias,
  initialised N(0, 1/width) (CLIP's ``width ** -0.5`` scale for both projections);
* the parameter is ``s = logit_scale = log(1/tau)``, a 0-d array initialised to ``ln(1/0.07)``; the ``clip`` op
  receives ``s`` itself and forms ``exp(s) cos(e_I, e_T)``, so its official scale (the mean of the two
  directions' cross-entropies) is kept unchanged;
* after every optimiser step, outside the graph, ``s <- min(max(s, 0), ln 100)``: :meth:`CLIPModel.after_step`
  (returns new params) or :meth:`CLIPModel.fit_after_step` (the ``after_step(step, params)`` hook of
  :func:`refssl.fit.fit`, which ignores return values: it replaces the dict entry in place);
* ``s`` is excluded from weight decay (open_clip), with biases, norms, tokens and position embeddings:
  :func:`no_decay`.

The gradient in ``s``, its sign on ranked and collapsed batches, and the clamp as a projection:
derivations/vision_language.md#clip-logit-scale.

The image encoder is any refssl module with ``init``, ``forward(params, state, images, train=)`` returning an
(N, F) feature and ``backward(cache, dout, need_dx=False)`` (a :class:`~refssl.nn.transformer.ViT`, or
:func:`~refssl.nn.models.cnn_encoder` without batch norm).  Encoders with running statistics are refused:
CLIP trains with per-batch contrastive targets and the model keeps no state.
"""

from __future__ import annotations

import numpy as np

from ..ops import clip as clip_op
from ..ops import linear, normalize
from .io import prefixed, subdict
from .layers import Linear, Sequential
from .text import TextEncoder
from .transformer import ViT
from .transformer import no_decay as _transformer_no_decay

__all__ = ["CLIPModel", "no_decay", "output_dim"]


def no_decay(name: str) -> bool:
    """Kept out of weight decay: the logit scale, biases, norm parameters, tokens, position embeddings."""
    return name == "logit_scale" or _transformer_no_decay(name)


def output_dim(module) -> int:
    """Width of the feature a refssl encoder returns (ViT, TextEncoder, or a Sequential ending in Linear)."""
    if isinstance(module, (ViT, TextEncoder)):
        return module.dim
    if isinstance(module, Sequential):
        for layer in reversed(module.layers):
            if isinstance(layer, Linear):
                return layer.d_out
    raise ValueError(f"cannot infer the output width of {type(module).__name__}; pass it explicitly")


class CLIPModel:
    """Dual encoder trained with the ``clip`` loss.  Params ``img.*``, ``txt.*``, ``img_proj.w``,
    ``txt_proj.w``, ``logit_scale`` (0-d)."""

    def __init__(self, image_encoder, text_encoder: TextEncoder, embed_dim: int, *, image_dim=None):
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.embed_dim = int(embed_dim)
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.image_dim = int(image_dim) if image_dim is not None else output_dim(image_encoder)
        self.text_dim = text_encoder.dim

    def init(self, rng, dtype=np.float32) -> dict:
        p_img, s_img = self.image_encoder.init(rng, dtype)
        if s_img:
            raise ValueError(f"the image encoder keeps state ({sorted(s_img)[:3]} ...): use one without batch "
                             "norm (cnn_encoder(norm=None) or a ViT)")
        p = prefixed(p_img, "img")
        p.update(prefixed(self.text_encoder.init(rng, dtype)[0], "txt"))
        e = self.embed_dim
        p["img_proj.w"] = (rng.standard_normal((self.image_dim, e)) / np.sqrt(self.image_dim)).astype(dtype)
        p["txt_proj.w"] = (rng.standard_normal((self.text_dim, e)) / np.sqrt(self.text_dim)).astype(dtype)
        p["logit_scale"] = np.asarray(clip_op.LOGIT_SCALE_INIT, dtype=dtype)
        return p

    # -- forward / backward --
    def loss(self, params, images, ids, attn_mask):
        """Symmetric CLIP loss of a batch of matching pairs (image i with caption i) and its cache."""
        if len(images) != len(ids):
            raise ValueError(f"images and ids must hold the same number of pairs, got {len(images)} and {len(ids)}")
        fi, c_img, _ = self.image_encoder.forward(subdict(params, "img"), {}, images, train=True)
        ft, c_txt, _ = self.text_encoder.forward(subdict(params, "txt"), {}, ids, attn_mask=attn_mask)
        ei, c_pi = linear.linear_forward(fi, params["img_proj.w"], None)
        et, c_pt = linear.linear_forward(ft, params["txt_proj.w"], None)
        value, c_clip = clip_op.clip_forward(ei, et, np.asarray(params["logit_scale"]))
        return value, (c_img, c_txt, c_pi, c_pt, c_clip)

    def backward(self, cache) -> dict:
        """Gradients of the loss with respect to every parameter (keys of ``params``)."""
        c_img, c_txt, c_pi, c_pt, c_clip = cache
        d_ei, d_et, d_s = clip_op.clip_backward(c_clip, 1.0)
        d_fi, d_wi, _ = linear.linear_backward(c_pi, d_ei)
        d_ft, d_wt, _ = linear.linear_backward(c_pt, d_et)
        grads = {"img_proj.w": d_wi, "txt_proj.w": d_wt, "logit_scale": d_s}
        grads.update(prefixed(self.image_encoder.backward(c_img, d_fi, need_dx=False)[1], "img"))
        grads.update(prefixed(self.text_encoder.backward(c_txt, d_ft)[1], "txt"))
        return grads

    def loss_and_grads(self, params, images, ids, attn_mask):
        value, cache = self.loss(params, images, ids, attn_mask)
        return float(value), self.backward(cache)

    # -- the clamp (a projection after each optimiser step, not part of the graph) --
    @staticmethod
    def after_step(params) -> dict:
        """New params with ``logit_scale`` clamped to [0, ln 100] (the other arrays are shared, not copied)."""
        out = dict(params)
        out["logit_scale"] = clip_op.clamp_logit_scale(np.asarray(params["logit_scale"]))
        return out

    @staticmethod
    def fit_after_step(step, params) -> None:
        """The clamp as :func:`refssl.fit.fit`'s ``after_step(step, params)`` hook: the dict entry is replaced
        in place (the array itself is not mutated), so the loop continues with the clamped value."""
        params["logit_scale"] = clip_op.clamp_logit_scale(np.asarray(params["logit_scale"]))

    @staticmethod
    def scale(params) -> float:
        """The multiplier exp(s) applied to the cosines (what open_clip logs)."""
        return float(np.exp(np.asarray(params["logit_scale"], dtype=np.float64)))

    # -- evaluation (no caches kept beyond one chunk) --
    def image_features(self, params, images, *, batch_size=512):
        """Image encoder output before the projection (N, F): the features a linear probe reads."""
        p = subdict(params, "img")
        return np.concatenate([self.image_encoder.forward(p, {}, images[s:s + batch_size], train=False)[0]
                               for s in range(0, len(images), batch_size)], axis=0)

    def encode_images(self, params, images, *, batch_size=512, normalize_output=True):
        """Projected image embeddings (N, embed_dim), L2-normalised unless ``normalize_output=False``."""
        e = linear.linear_forward(self.image_features(params, images, batch_size=batch_size),
                                  params["img_proj.w"], None)[0]
        return normalize.l2_normalize_forward(e)[0] if normalize_output else e

    def encode_texts(self, params, ids, attn_mask, *, batch_size=512, normalize_output=True):
        """Projected caption embeddings (N, embed_dim), L2-normalised unless ``normalize_output=False``."""
        p = subdict(params, "txt")
        f = np.concatenate([self.text_encoder.forward(p, {}, ids[s:s + batch_size],
                                                      attn_mask=attn_mask[s:s + batch_size])[0]
                            for s in range(0, len(ids), batch_size)], axis=0)
        e = linear.linear_forward(f, params["txt_proj.w"], None)[0]
        return normalize.l2_normalize_forward(e)[0] if normalize_output else e

    def logits(self, params, images, ids, attn_mask):
        """exp(s) cos(image_i, text_j) (N_images, N_texts): the scores of retrieval and zero-shot prompts."""
        return self.scale(params) * (self.encode_images(params, images) @ self.encode_texts(params, ids,
                                                                                           attn_mask).T)
