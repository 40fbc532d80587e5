"""Text encoder: token + learned position embeddings, pre-norm transformer blocks over the padded sequence,
a final LayerNorm, and the ``[CLS]`` output as the sentence feature.

    enc = TextEncoder(vocab_size=40, max_len=12, dim=64, depth=2, n_heads=4)
    params, _ = enc.init(np.random.default_rng(0))
    feat, cache, _ = enc.forward(params, {}, ids, attn_mask=attn_mask)     # (B, D)
    _, grads = enc.backward(cache, dfeat)                                   # keys of params
    y = enc.tokens(params, ids, attn_mask)                                  # (B, T, D), every position

Input layout (the tokenizer of :mod:`refssl.data.captions`): ``ids`` (B, T) int laid out
``[CLS] w ... [SEP] [PAD] ...``, ``attn_mask`` (B, T) bool, True on real tokens.  The mask is passed to every
block as the attention ``key_mask``: no query attends to a padding key, so the ``[CLS]`` output (and every
real token's output) does not depend on what the padding holds or on how much of it there is.  Padding
positions still run as queries; their outputs are computed and ignored.

Conventions and where they come from:

* embeddings ``x_t = E[id_t] + P[t]`` through the registered ``embedding`` op (BERT, Devlin et al. 2018,
  arXiv 1810.04805; CLIP's text transformer, Radford et al. 2021, arXiv 2103.00020, openai/CLIP
  ``clip/model.py``), both tables initialised N(0, 0.02²) (BERT's ``initializer_range``; CLIP uses 0.02 for
  tokens and 0.01 for positions);
* the blocks are refssl's pre-norm :class:`~refssl.nn.transformer.TransformerBlock` with a final LayerNorm, as
  CLIP's text transformer (``ln_final``); BERT itself is post-norm;
* pooling: the final ``[CLS]`` token (BERT).  CLIP instead reads the ``[EOT]`` token of a causal transformer;
  with a bidirectional encoder and a padding mask, the first token sees the whole caption, which is what
  the pooling needs.

Params: ``tok.table`` (V, D), ``pos`` (max_len, D), ``blocks.{i}.*``, ``norm.gamma``, ``norm.beta``.
"""

from __future__ import annotations

import numpy as np

from ..ops import attention
from .io import prefixed, subdict
from .layers import Module
from .transformer import TransformerStack, _ln, _ln_backward, _ln_init, _trunc_normal

__all__ = ["TextEncoder", "check_text_batch"]


def check_text_batch(ids, attn_mask, max_len):
    """Validate a tokenised batch: ids (B, T) integer, attn_mask (B, T) bool with the first token real."""
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer numpy array (B, T), got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids must have shape (B, T) with B, T >= 1, got shape {ids.shape}")
    if ids.shape[1] > max_len:
        raise ValueError(f"ids has T = {ids.shape[1]} positions, more than max_len = {max_len}")
    if not isinstance(attn_mask, np.ndarray) or attn_mask.dtype != np.bool_:
        raise TypeError(f"attn_mask must be a bool numpy array (True = real token), got "
                        f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
    if attn_mask.shape != ids.shape:
        raise ValueError(f"attn_mask must have the shape of ids {ids.shape}, got shape {attn_mask.shape}")
    if not attn_mask[:, 0].all():
        raise ValueError("attn_mask must be True at position 0 (the [CLS] token) of every row")


class TextEncoder(Module):
    """Transformer text encoder with ``[CLS]`` pooling (see the module docstring)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, n_heads: int,
                 mlp_ratio: float = 4):
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.dim, self.depth, self.n_heads = int(dim), int(depth), int(n_heads)
        if self.vocab_size < 1 or self.max_len < 1:
            raise ValueError(f"vocab_size and max_len must be >= 1, got {vocab_size}, {max_len}")
        self.stack = TransformerStack(dim, depth, n_heads, mlp_ratio)

    def init(self, rng, dtype=np.float32):
        d = self.dim
        p = {"tok.table": (0.02 * rng.standard_normal((self.vocab_size, d))).astype(dtype),
             "pos": _trunc_normal(rng, 0.02, (self.max_len, d), dtype)}
        p.update(prefixed(self.stack.init(rng, dtype)[0], "blocks"))
        p["norm.gamma"], p["norm.beta"] = _ln_init(d, dtype)
        return p, {}

    # -- stages (VisualBERT reuses the embedding arithmetic, not this class) --
    def _run(self, params, ids, attn_mask):
        check_text_batch(ids, attn_mask, self.max_len)
        t = ids.shape[1]
        e_tok, c_tok = attention.embedding_forward(ids, params["tok.table"])
        e_pos, c_pos = attention.embedding_forward(np.arange(t), params["pos"])
        x = e_tok + e_pos  # (B, T, D) + (T, D)
        outs, c_blocks = self.stack.forward_outputs(subdict(params, "blocks"), x, key_mask=attn_mask)
        y, c_norm = _ln(params, "norm", outs[-1] if outs else x)
        return y, (c_tok, c_pos, c_blocks, c_norm, y.shape)

    def forward(self, params, state, ids, *, attn_mask, train=True):
        """ids (B, T) int, attn_mask (B, T) bool -> ([CLS] feature (B, D), cache, state)."""
        y, cache = self._run(params, ids, attn_mask)
        return y[:, 0], cache, state

    def backward(self, cache, dout, *, need_dx=False):
        """(None, grads): the ids get no gradient."""
        c_tok, c_pos, c_blocks, c_norm, shape = cache
        dy = np.zeros(shape, dout.dtype)
        dy[:, 0] = dout
        return None, self.backward_tokens(cache, dy)

    def backward_tokens(self, cache, dy):
        """Parameter gradients given the gradient of every final token (B, T, D)."""
        c_tok, c_pos, c_blocks, c_norm, _ = cache
        grads = {}
        d = _ln_backward(c_norm, dy, "norm", grads)
        dx, g = self.stack.backward(c_blocks, d)
        grads.update(prefixed(g, "blocks"))
        grads["tok.table"] = attention.embedding_backward(c_tok, dx)[1]
        grads["pos"] = attention.embedding_backward(c_pos, dx.sum(axis=0))[1]
        return grads

    def tokens(self, params, ids, attn_mask):
        """Final normed tokens (B, T, D) of every position (evaluation; no cache kept)."""
        return self._run(params, ids, attn_mask)[0]

    def tokens_with_cache(self, params, ids, attn_mask):
        """(final normed tokens (B, T, D), cache for :meth:`backward_tokens`)."""
        return self._run(params, ids, attn_mask)
