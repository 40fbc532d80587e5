"""refssl: numpy reference implementations of self-supervised losses with hand-written gradients.

Every differentiable op is a ``forward(*arrays, **hyper) -> (out, cache)`` /
``backward(cache, grad_out) -> grads`` pair registered in :mod:`refssl.registry`;
:mod:`refssl.gradcheck` checks each backward against finite differences.
"""

__version__ = "0.1.0"

from . import registry  # noqa: E402,F401
