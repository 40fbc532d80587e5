"""Attention: scaled dot-product attention and multi-head self-attention (timm/MAE layout).

Where ports go wrong: the key padding mask (masked keys get probability exactly 0 and no gradient;
True = may be attended, as PyTorch's boolean attn_mask), large logits (exp without a max shift), the
1/sqrt(dh) scale, the head split of the fused qkv projection.
"""

from __future__ import annotations

import numpy as np

from . import Family

F = Family("attention", "softmax attention over keys")


def _mask(b, n_keys, masked):
    m = np.ones((b, n_keys), dtype=bool)
    for row, cols in masked.items():
        m[row, cols] = False
    return m


def _sdpa(rng, b, h, lq, lk, dh, scale=1.0):
    return tuple(scale * rng.standard_normal((b, h, length, dh)) for length in (lq, lk, lk))


@F.edge("scaled_dot_product_attention", "masked_keys",
        "key padding mask: batch row 0 masks keys 1 and 3, row 1 masks key 0 (no row fully masked)")
def _sdpa_masked(rng):
    q, k, v = _sdpa(rng, 2, 2, 3, 4, 3)
    return (q, k, v, _mask(2, 4, {0: [1, 3], 1: [0]})), {}


@F.edge("scaled_dot_product_attention", "no_mask", "every key attendable (an all-True mask)")
def _sdpa_nomask(rng):
    q, k, v = _sdpa(rng, 1, 2, 3, 3, 2)
    return (q, k, v, np.ones((1, 3), dtype=bool)), {}


@F.edge("scaled_dot_product_attention", "large_logits",
        "q, k scaled so q.k/sqrt(dh) reaches ~100: exp overflows float32 without a max shift")
def _sdpa_large(rng):
    b = rng.standard_normal(4)
    b *= 10.0 / np.linalg.norm(b)
    q = b + 0.3 * rng.standard_normal((1, 2, 3, 4))
    k = b + 0.3 * rng.standard_normal((1, 2, 4, 4))
    v = rng.standard_normal((1, 2, 4, 4))
    return (q, k, v, _mask(1, 4, {0: [2]})), {}


def _mha(rng, b, n_tok, n_heads, dh):
    d = n_heads * dh
    x = rng.standard_normal((b, n_tok, d))
    w_qkv = rng.standard_normal((d, 3 * d)) / np.sqrt(d)
    b_qkv = 0.5 * rng.standard_normal(3 * d)
    w_out = rng.standard_normal((d, d)) / np.sqrt(d)
    b_out = 0.5 * rng.standard_normal(d)
    return x, w_qkv, b_qkv, w_out, b_out


@F.edge("multi_head_attention", "masked_tokens", "3 heads, padding mask on two tokens of sample 0")
def _mha_masked(rng):
    return (*_mha(rng, 2, 4, 3, 2), _mask(2, 4, {0: [1, 2]})), {"n_heads": 3}


@F.edge("multi_head_attention", "single_head", "n_heads = 1 (dh = D)")
def _mha_one(rng):
    return (*_mha(rng, 1, 3, 1, 4), np.ones((1, 3), dtype=bool)), {"n_heads": 1}


@F.edge("multi_head_attention", "many_heads", "4 heads of width 2 over 5 tokens")
def _mha_many(rng):
    return (*_mha(rng, 1, 5, 4, 2), _mask(1, 5, {0: [4]})), {"n_heads": 4}
