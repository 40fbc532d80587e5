"""Builders of the networks used in the experiments: MLP, small CNN encoder, projector, predictor, decoder."""

from __future__ import annotations

from .layers import (GELU, AvgPool2d, BatchNorm, Conv2d, ConvTranspose2d, Flatten, LayerNorm, Linear,
                     MaxPool2d, ReLU, Sequential, Sigmoid, Unflatten)

__all__ = ["mlp", "cnn_encoder", "projector", "predictor", "conv_decoder", "linear_decoder"]

_ACTS = {"relu": ReLU, "gelu": GELU}


def _act(name):
    try:
        return _ACTS[name]()
    except KeyError:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {name!r}") from None


def _norm(kind, width):
    if kind is None:
        return []
    if kind == "batch":
        return [BatchNorm(width)]
    if kind == "layer":
        return [LayerNorm(width)]
    raise ValueError(f"norm must be None, 'batch' or 'layer', got {kind!r}")


def mlp(dims, *, norm=None, act="relu", last_bias=True, last_norm=False, flatten=False) -> Sequential:
    """``dims = [d_0, ..., d_L]``: L linear layers; every hidden layer is Linear -> [norm] -> act.

    ``flatten=True`` prepends a Flatten, so that the MLP takes images (N, C, H, W) with d_0 = C*H*W.

    The last layer is a plain Linear (bias as ``last_bias``); ``last_norm=True`` appends the norm after it
    (the SimSiam projector ends in batch norm).
    A hidden Linear followed by batch norm has no bias (the norm's beta replaces it).
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2:
        raise ValueError(f"dims needs at least an input and an output width, got {dims}")
    layers = [Flatten()] if flatten else []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [Linear(a, b, bias=norm != "batch"), *_norm(norm, b), _act(act)]
    layers.append(Linear(dims[-2], dims[-1], bias=last_bias))
    if last_norm:
        layers += _norm(norm, dims[-1])
    return Sequential(layers)


def cnn_encoder(*, in_channels=3, image_size=32, channels=(16, 32, 64), out_dim=128, norm=None,
                pool="max") -> Sequential:
    """Small CNN: [conv3x3 (padding 1) -> [batch norm] -> ReLU -> 2x2 pool] per entry of ``channels``,
    then Flatten -> Linear(channels[-1] * s^2, out_dim) with s = image_size / 2^len(channels).

    Default on 32x32x3 input: 3->16->32->64 channels at 32, 16, 8 pixels, a 4x4x64 = 1024 feature map and
    a 128-d output (about 155k parameters, 131k of them in the final Linear).
    """
    if norm not in (None, "batch"):
        raise ValueError(f"norm must be None or 'batch' for the CNN encoder, got {norm!r}")
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    size, c_prev, layers = int(image_size), int(in_channels), []
    for c in channels:
        if size % 2:
            raise ValueError(f"image_size={image_size} is not divisible by 2^{len(channels)}")
        layers += [Conv2d(c_prev, c, 3, padding=1, bias=norm is None), *_norm(norm, c), ReLU(),
                   MaxPool2d(2) if pool == "max" else AvgPool2d(2)]
        c_prev, size = c, size // 2
    layers += [Flatten(), Linear(c_prev * size * size, out_dim)]
    return Sequential(layers)


def projector(d_in, hidden=512, d_out=128, *, layers=2, norm="batch", last_norm=False) -> Sequential:
    """Projection head (SimCLR: 2 layers, BN + ReLU in the hidden layer)."""
    return mlp([d_in] + [hidden] * (layers - 1) + [d_out], norm=norm, last_norm=last_norm)


def predictor(dim, hidden=512, *, norm="batch") -> Sequential:
    """Prediction head of BYOL/SimSiam: dim -> hidden (BN, ReLU) -> dim."""
    return mlp([dim, hidden, dim], norm=norm)


def conv_decoder(latent_dim, *, out_channels=3, image_size=32, channels=(64, 32, 16),
                 out_act="sigmoid") -> Sequential:
    """Decoder for the autoencoder, mirroring :func:`cnn_encoder`.

    Linear(latent_dim -> channels[0] * s^2) -> ReLU -> reshape to (channels[0], s, s), then a
    transposed convolution (kernel 4, stride 2, padding 1: doubles the size) per further channel entry
    and a final one to ``out_channels``, ReLU between them and ``out_act`` at the end: ``"sigmoid"``
    (pixels in [0, 1]) or None (a linear output, which trains faster with a squared error on images with a
    mostly black background: a saturated sigmoid passes little gradient); s = image_size / 2^len(channels).
    """
    if out_act not in ("sigmoid", None):
        raise ValueError(f"out_act must be 'sigmoid' or None, got {out_act!r}")
    n_up = len(channels)
    s = int(image_size) >> n_up
    if s << n_up != image_size or s < 1:
        raise ValueError(f"image_size={image_size} is not divisible by 2^{n_up}")
    layers = [Linear(latent_dim, channels[0] * s * s), ReLU(), Unflatten((channels[0], s, s))]
    widths = list(channels) + [out_channels]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(ConvTranspose2d(a, b, kernel=4, stride=2, padding=1))
        if i < n_up - 1:
            layers.append(ReLU())
        elif out_act == "sigmoid":
            layers.append(Sigmoid())
    return Sequential(layers)


def linear_decoder(latent_dim, *, out_channels=3, image_size=32) -> Sequential:
    """The simplest decoder: one Linear to all pixels, sigmoid, reshape to (C, H, W)."""
    return Sequential([Linear(latent_dim, out_channels * image_size * image_size), Sigmoid(),
                       Unflatten((out_channels, image_size, image_size))])
