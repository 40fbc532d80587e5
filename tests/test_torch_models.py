"""Whole models against PyTorch: refssl's hand-written backward vs torch autograd of the same weights.

In float64, a pre-norm transformer block (with and without a key padding mask), the ViT encoder and
MAE (the same masking triple given to both) are run in refssl and in the ``torch.nn.functional`` port
``ports/torch/vit.py``, on the same parameter values loaded from refssl's dict.  The loss (or output)
and EVERY parameter gradient must agree to ``RTOL`` = 1e-10 relative to the largest entry of each
array: the two are independent implementations (autograd vs hand-written chain rules), so an error
in any backward, or any convention difference (positions, patch order, qkv split, eps), shows up here.

The torch port is also run with ``F.scaled_dot_product_attention`` (timm's fused path), which checks
that the written-out attention of the port is the one torch uses.
"""

import pathlib
import re

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the cross-check is optional: refssl itself never needs torch
    torch = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="torch is not importable; this optional cross-check needs it (pip install -e .[torch])")

RTOL = 1e-10
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _close(ours, theirs, name):
    """max |ours - theirs| <= RTOL * max(|theirs|) (a scale-relative bound: elementwise relative error is
    meaningless for entries that are zero up to cancellation)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    scale = max(float(np.max(np.abs(theirs))), 1e-300)
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= RTOL * scale, f"{name}: max abs error {err:.3e} vs scale {scale:.3e} (rtol {RTOL})"


def _same_grads(ours: dict, tensors: dict):
    from ports.torch import vit as tv
    theirs = tv.grads_numpy(tensors)
    assert set(ours) == set(tensors), set(ours) ^ set(tensors)
    assert set(theirs) == set(tensors), f"torch gave no gradient to {set(tensors) - set(theirs)}"
    for k in sorted(ours):
        assert np.asarray(ours[k]).dtype == np.float64, k
        _close(ours[k], theirs[k], k)


def _jitter(params, rng, scale=0.1):
    """Move every parameter off its init (zero biases, unit gammas) so no gradient term vanishes."""
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in params.items()}


def test_refssl_never_imports_torch():
    """The package itself stays numpy-only (the port lives in ports/, outside it)."""
    pattern = re.compile(r"^\s*(import\s+torch|from\s+torch[\s.])", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "refssl").rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders


@needs_torch
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sdpa", [False, True])
def test_transformer_block_matches_torch(masked, sdpa):
    from ports.torch import vit as tv
    from refssl.nn.transformer import TransformerBlock

    rng = np.random.default_rng(1 + masked + 2 * sdpa)
    b, length, d, heads = 3, 6, 8, 2
    blk = TransformerBlock(d, n_heads=heads, mlp_ratio=2)
    params = _jitter(blk.init(rng, np.float64)[0], rng)
    x = rng.standard_normal((b, length, d))
    key_mask = None
    if masked:
        key_mask = rng.random((b, length)) < 0.6
        key_mask[:, 0] = True  # every query needs one key it may attend to
        key_mask[0, -1] = False  # at least one key masked
    g = rng.standard_normal((b, length, d))

    out, cache, _ = blk.forward(params, {}, x, key_mask=key_mask)
    dx, grads = blk.backward(cache, g)

    tp = tv.load_params(params)
    tx = torch.tensor(x, requires_grad=True)
    tmask = None if key_mask is None else torch.as_tensor(key_mask)
    tout = tv.block_forward(tp, tx, n_heads=heads, key_mask=tmask, sdpa=sdpa)
    (tout * torch.as_tensor(g)).sum().backward()

    _close(out, tout.detach().numpy(), "out")
    _close(dx, tx.grad.numpy(), "dx")
    _same_grads(grads, tp)


@needs_torch
@pytest.mark.parametrize("pool,pos", [("cls", "sincos"), ("mean", "learned")])
def test_vit_encoder_matches_torch(pool, pos):
    from ports.torch import vit as tv
    from refssl.nn.transformer import ViT

    rng = np.random.default_rng(11 if pool == "cls" else 12)
    model = ViT(image_size=8, patch=2, in_channels=3, dim=8, depth=2, n_heads=2, mlp_ratio=2, pos=pos,
                pool=pool)
    params = _jitter(model.init(rng, np.float64)[0], rng)
    images = rng.standard_normal((3, 3, 8, 8))
    g = rng.standard_normal((3, 8))

    pooled, cache, _ = model.forward(params, {}, images)
    _, grads = model.backward(cache, g)

    tp = tv.load_params(params)
    tpooled = tv.vit_forward(tp, torch.tensor(images), patch=2, n_heads=2, pool=pool)
    (tpooled * torch.as_tensor(g)).sum().backward()

    _close(pooled, tpooled.detach().numpy(), "pooled")
    _same_grads(grads, tp)


@needs_torch
@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_matches_torch(norm_pix):
    from ports.torch import vit as tv
    from refssl.nn.mae import MAE

    rng = np.random.default_rng(21 + norm_pix)
    model = MAE(image_size=8, patch=2, dim=8, depth=2, n_heads=2, dec_dim=8, dec_depth=1, dec_heads=2,
                mlp_ratio=2, mask_ratio=0.75, norm_pix=norm_pix)
    params = _jitter(model.init(rng, np.float64), rng)
    images = rng.standard_normal((3, 3, 8, 8))
    masks = model.draw_masking(3, rng)

    loss, cache = model.loss(params, images, masks=masks)
    grads = model.backward(cache)

    tp = tv.load_params(params)
    tloss = tv.mae_forward(tp, torch.tensor(images), *masks, patch=2, n_heads=2, dec_heads=2,
                           norm_pix=norm_pix)
    tloss.backward()

    _close(loss, tloss.item(), "loss")
    _same_grads(grads, tp)


@needs_torch
def test_port_layout_conventions():
    """Port facts a timm user relies on, checked against torch's own conv patch embedding: refssl's
    ``patch.w`` rearranged to a conv weight gives the same embedding as the port's patchify + linear."""
    from ports.torch import vit as tv

    rng = np.random.default_rng(5)
    p, c, d = 2, 3, 4
    w = rng.standard_normal((p * p * c, d))
    images = torch.tensor(rng.standard_normal((2, c, 6, 6)))
    conv_w = torch.tensor(w).reshape(p, p, c, d).permute(3, 2, 0, 1)  # (D, C, p, p)
    via_conv = torch.nn.functional.conv2d(images, conv_w, stride=p).flatten(2).transpose(1, 2)
    via_port = tv.patchify(images, p) @ torch.tensor(w)
    assert torch.allclose(via_conv, via_port, rtol=1e-12, atol=1e-12)
