"""PyTorch ports of refssl models (not part of the ``refssl`` package, which never imports torch).

``ports.torch.vit``: the pre-norm transformer block, the ViT encoder and MAE written with
``torch.nn.functional`` on tensors loaded from a refssl parameter dict, for checking refssl's hand-written
gradients against torch autograd of the same weights (``tests/test_torch_models.py``) and for timing
(``benchmarks/bench_vit_step.py``).  Needs torch (``pip install -e .[torch]``).
"""

from . import vit

__all__ = ["vit"]
