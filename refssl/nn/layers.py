"""Layer modules: thin stateless wrappers that bind registered ops to named parameters.

A module holds only its structure (sizes, hyperparameters).  Arrays live in plain dicts:

* ``params`` -- learnable arrays, e.g. ``{"w": ..., "b": ...}``; gradients use the same keys;
* ``state``  -- non-learned buffers (batch-norm running statistics), updated functionally.

Every module implements

    init(rng, dtype)                          -> (params, state)
    forward(params, state, x, *, train=True)  -> (out, cache, new_state)
    backward(cache, dout, *, need_dx=True)    -> (dx, grads)

``need_dx=False`` lets the first layer of a network skip the gradient of its input (the images), which
for a convolution saves a GEMM and the col2im scatter; ``dx`` is then None.

``forward`` never mutates ``params`` or ``state``: a module with buffers returns a new state dict in
training mode and the same one in evaluation mode.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import activations, conv, linear, norm_layers, normalize, pooling

__all__ = [
    "Module", "Linear", "Conv2d", "ConvTranspose2d", "ReLU", "GELU", "Sigmoid", "Flatten", "Unflatten",
    "MaxPool2d", "AvgPool2d", "BatchNorm", "LayerNorm", "L2Normalize", "Sequential",
]


class Module:
    """Base class: a module without parameters or state."""

    def init(self, rng: np.random.Generator, dtype=np.float32):
        return {}, {}

    def forward(self, params, state, x, *, train=True):
        raise NotImplementedError

    def backward(self, cache, dout, *, need_dx=True):
        """(dx, grads).  With ``need_dx=False`` a module may skip the input gradient and return None."""
        raise NotImplementedError

    def __call__(self, params, state, x, *, train=False):
        """Output only (evaluation mode by default)."""
        return self.forward(params, state, x, train=train)[0]

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _uniform(rng, bound, shape, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Linear(Module):
    """``out = x @ w + b``; w (d_in, d_out).

    Initialisation: PyTorch's default for ``nn.Linear``, w and b ~ U(-1/sqrt(d_in), 1/sqrt(d_in)).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        self.d_in, self.d_out, self.bias = int(d_in), int(d_out), bool(bias)

    def init(self, rng, dtype=np.float32):
        bound = 1.0 / math.sqrt(self.d_in)
        p = {"w": _uniform(rng, bound, (self.d_in, self.d_out), dtype)}
        if self.bias:
            p["b"] = _uniform(rng, bound, (self.d_out,), dtype)
        return p, {}

    def forward(self, params, state, x, *, train=True):
        out, cache = linear.linear_forward(x, params["w"], params.get("b"))
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        dx, dw, db = linear.linear_backward(cache, dout)
        return dx, ({"w": dw, "b": db} if db is not None else {"w": dw})


class Conv2d(Module):
    """2-D convolution, NCHW; w (c_out, c_in, k, k).  Init: PyTorch's default, U(+-1/sqrt(c_in k^2))."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        self.c_in, self.c_out, self.kernel = int(c_in), int(c_out), int(kernel)
        self.stride, self.padding, self.bias = int(stride), int(padding), bool(bias)

    def init(self, rng, dtype=np.float32):
        bound = 1.0 / math.sqrt(self.c_in * self.kernel ** 2)
        p = {"w": _uniform(rng, bound, (self.c_out, self.c_in, self.kernel, self.kernel), dtype)}
        if self.bias:
            p["b"] = _uniform(rng, bound, (self.c_out,), dtype)
        return p, {}

    def forward(self, params, state, x, *, train=True):
        # The strided variant: the output stays a channels-last view, which the next layers take as is.
        out, cache = conv.conv2d_forward_strided(x, params["w"], params.get("b"), stride=self.stride,
                                                 padding=self.padding)
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        if need_dx:
            dx, dw, db = conv.conv2d_backward(cache, dout)
        else:
            dx, (dw, db) = None, conv.conv2d_param_grads(cache, dout)
        return dx, ({"w": dw, "b": db} if db is not None else {"w": dw})


class ConvTranspose2d(Module):
    """Transposed convolution, NCHW; w (c_in, c_out, k, k).  Init: PyTorch's default, U(+-1/sqrt(c_out k^2)).

    With kernel 4, stride 2, padding 1 it doubles the spatial size exactly (the decoder's upsampling step).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 4, stride: int = 2, padding: int = 1,
                 bias: bool = True):
        self.c_in, self.c_out, self.kernel = int(c_in), int(c_out), int(kernel)
        self.stride, self.padding, self.bias = int(stride), int(padding), bool(bias)

    def init(self, rng, dtype=np.float32):
        bound = 1.0 / math.sqrt(self.c_out * self.kernel ** 2)
        p = {"w": _uniform(rng, bound, (self.c_in, self.c_out, self.kernel, self.kernel), dtype)}
        if self.bias:
            p["b"] = _uniform(rng, bound, (self.c_out,), dtype)
        return p, {}

    def forward(self, params, state, x, *, train=True):
        out, cache = conv.conv_transpose2d_forward(x, params["w"], params.get("b"), stride=self.stride,
                                                   padding=self.padding)
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        dx, dw, db = conv.conv_transpose2d_backward(cache, dout)
        return dx, ({"w": dw, "b": db} if db is not None else {"w": dw})


class _Pointwise(Module):
    """A parameter-free op with keyword hyperparameters."""

    _fwd = _bwd = None

    def _kwargs(self):
        return {}

    def forward(self, params, state, x, *, train=True):
        out, cache = type(self)._fwd(x, **self._kwargs())
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        return type(self)._bwd(cache, dout)[0], {}


class ReLU(_Pointwise):
    _fwd, _bwd = activations.relu_forward, activations.relu_backward


class GELU(_Pointwise):
    """Exact (erf) GELU."""

    _fwd, _bwd = activations.gelu_forward, activations.gelu_backward


class Sigmoid(_Pointwise):
    _fwd, _bwd = activations.sigmoid_forward, activations.sigmoid_backward


class Flatten(_Pointwise):
    _fwd, _bwd = linear.flatten_forward, linear.flatten_backward


class L2Normalize(_Pointwise):
    """Row-wise L2 normalisation (the registered ``l2_normalize`` op)."""

    _fwd, _bwd = normalize.l2_normalize_forward, normalize.l2_normalize_backward


class MaxPool2d(_Pointwise):
    _fwd, _bwd = pooling.max_pool2d_forward, pooling.max_pool2d_backward

    def __init__(self, kernel: int = 2, stride: int | None = None):
        self.kernel, self.stride = int(kernel), stride

    def _kwargs(self):
        return {"kernel": self.kernel, "stride": self.stride}


class AvgPool2d(MaxPool2d):
    _fwd, _bwd = pooling.avg_pool2d_forward, pooling.avg_pool2d_backward


class Unflatten(Module):
    """Reshape (N, prod(shape)) -> (N, *shape): the inverse of :class:`Flatten` (backward is a reshape)."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)

    def forward(self, params, state, x, *, train=True):
        if x.ndim != 2 or x.shape[1] != math.prod(self.shape):
            raise ValueError(f"x must have shape (N, {math.prod(self.shape)}) to unflatten to "
                             f"(N, {', '.join(map(str, self.shape))}), got shape {x.shape}")
        return x.reshape((x.shape[0],) + self.shape), x.shape, state

    def backward(self, cache, dout, *, need_dx=True):
        return np.asarray(dout).reshape(cache), {}


class BatchNorm(Module):
    """Batch norm over (N, C) or (N, C, H, W) input.  Params gamma (=1), beta (=0); state running_mean (=0),
    running_var (=1).  ``train=True``: batch statistics, returns updated running statistics;
    ``train=False``: running statistics, state unchanged."""

    def __init__(self, channels: int, eps: float = norm_layers.DEFAULT_EPS,
                 momentum: float = norm_layers.DEFAULT_MOMENTUM):
        self.channels, self.eps, self.momentum = int(channels), float(eps), float(momentum)

    def init(self, rng, dtype=np.float32):
        c = self.channels
        return ({"gamma": np.ones(c, dtype), "beta": np.zeros(c, dtype)},
                {"running_mean": np.zeros(c, dtype), "running_var": np.ones(c, dtype)})

    def forward(self, params, state, x, *, train=True):
        if train:
            out, cache = norm_layers.batch_norm_forward(x, params["gamma"], params["beta"], eps=self.eps)
            mean, var = norm_layers.batch_norm_batch_stats(cache)
            rm, rv = norm_layers.batch_norm_update_running(state["running_mean"], state["running_var"],
                                                           mean, var, momentum=self.momentum)
            return out, (True, cache), {"running_mean": rm, "running_var": rv}
        out, cache = norm_layers.batch_norm_eval_forward(x, params["gamma"], params["beta"],
                                                         state["running_mean"], state["running_var"],
                                                         eps=self.eps)
        return out, (False, cache), state

    def backward(self, cache, dout, *, need_dx=True):
        train, c = cache
        bwd = norm_layers.batch_norm_backward if train else norm_layers.batch_norm_eval_backward
        dx, dgamma, dbeta = bwd(c, dout)[:3]
        return dx, {"gamma": dgamma, "beta": dbeta}


class LayerNorm(Module):
    """Layer norm over the last axis; params gamma (=1), beta (=0)."""

    def __init__(self, dim: int, eps: float = norm_layers.DEFAULT_EPS):
        self.dim, self.eps = int(dim), float(eps)

    def init(self, rng, dtype=np.float32):
        return {"gamma": np.ones(self.dim, dtype), "beta": np.zeros(self.dim, dtype)}, {}

    def forward(self, params, state, x, *, train=True):
        out, cache = norm_layers.layer_norm_forward(x, params["gamma"], params["beta"], eps=self.eps)
        return out, cache, state

    def backward(self, cache, dout, *, need_dx=True):
        dx, dgamma, dbeta = norm_layers.layer_norm_backward(cache, dout)
        return dx, {"gamma": dgamma, "beta": dbeta}


def _sub(d, prefix):
    """Entries of ``d`` under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in d.items() if k.startswith(p)}


# The cache entry of a MaxPool2d that ran fused with the ReLU before it (whose entry holds the fused cache).
_FUSED_WITH_PREVIOUS = object()


def _relu_then_max_pool2x2(layers, i):
    """Layers i, i+1 are a ReLU and a 2x2 max-pool (kernel = stride = 2), which Sequential runs as one op."""
    if i + 1 >= len(layers) or type(layers[i]) is not ReLU or type(layers[i + 1]) is not MaxPool2d:
        return False
    stride = layers[i + 1].stride  # as given: only None or the int 2 (anything else, the op decides)
    return layers[i + 1].kernel == 2 and (stride is None or (type(stride) is int and stride == 2))


class Sequential(Module):
    """A chain of modules.  Parameter and state names are ``"{index}.{name}"`` (e.g. ``"0.w"``,
    ``"1.running_mean"``); the backward pass is the reverse chain over the per-layer caches.

    A ``ReLU`` directly followed by a ``MaxPool2d(2)`` runs as one fused op
    (:func:`refssl.ops.pooling.relu_max_pool2x2_forward`: pooling first, ReLU on the 4x smaller result):
    same output and gradients, without the ReLU's passes over the full-size activation.  Calling the
    layers one by one gives the unfused computation."""

    def __init__(self, *layers: Module):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        self.layers = list(layers)

    def init(self, rng, dtype=np.float32):
        params, state = {}, {}
        for i, layer in enumerate(self.layers):
            p, s = layer.init(rng, dtype)
            params.update({f"{i}.{k}": v for k, v in p.items()})
            state.update({f"{i}.{k}": v for k, v in s.items()})
        return params, state

    def forward(self, params, state, x, *, train=True):
        caches, new_state = [], {}
        i = 0
        while i < len(self.layers):
            if _relu_then_max_pool2x2(self.layers, i):
                # One pass for both (same values and gradients as the two layers, see
                # pooling.relu_max_pool2x2_forward); neither layer has parameters or state.
                x, c = pooling.relu_max_pool2x2_forward(x)
                caches += [c, _FUSED_WITH_PREVIOUS]
                i += 2
                continue
            layer = self.layers[i]
            x, c, s = layer.forward(_sub(params, str(i)), _sub(state, str(i)), x, train=train)
            caches.append(c)
            new_state.update({f"{i}.{k}": v for k, v in s.items()})
            i += 1
        return x, caches, new_state

    def backward(self, cache, dout, *, need_dx=True):
        grads = {}
        i = len(self.layers) - 1
        while i >= 0:
            if cache[i] is _FUSED_WITH_PREVIOUS:  # layers i - 1 (ReLU) and i (MaxPool2d) ran as one op
                (dout,) = pooling.relu_max_pool2x2_backward(cache[i - 1], dout)
                i -= 2
                continue
            dout, g = self.layers[i].backward(cache[i], dout, need_dx=need_dx or i > 0)
            grads.update({f"{i}.{k}": v for k, v in g.items()})
            i -= 1
        return dout, grads

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"
