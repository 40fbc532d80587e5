"""Networks built from the registered layer ops, with parameters and gradients as plain dicts.

    enc = nn.cnn_encoder(out_dim=128)
    params, state = enc.init(np.random.default_rng(0))          # {"0.w": ..., "0.b": ..., "9.w": ...}
    z, cache, state = enc.forward(params, state, x, train=True)
    dx, grads = enc.backward(cache, dz)                           # grads has the keys of params

Top-level names carry a prefix per network (``"enc.0.w"``, ``"proj.0.w"``): see :func:`prefixed` and
:func:`subdict`.  ``save_npz`` / ``load_npz`` store such dicts atomically.
"""

from .io import add_into, load_npz, prefixed, save_npz, subdict
from .layers import (GELU, AvgPool2d, BatchNorm, Conv2d, ConvTranspose2d, Flatten, L2Normalize, LayerNorm,
                     Linear, MaxPool2d, Module, ReLU, Sequential, Sigmoid, Unflatten)
from .models import cnn_encoder, conv_decoder, linear_decoder, mlp, predictor, projector

__all__ = [
    "Module", "Linear", "Conv2d", "ConvTranspose2d", "ReLU", "GELU", "Sigmoid", "Flatten", "Unflatten",
    "MaxPool2d", "AvgPool2d", "BatchNorm", "LayerNorm", "L2Normalize", "Sequential",
    "mlp", "cnn_encoder", "projector", "predictor", "conv_decoder", "linear_decoder",
    "prefixed", "subdict", "add_into", "save_npz", "load_npz",
]
