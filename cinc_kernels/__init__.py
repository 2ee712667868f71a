"""cinc_kernels: exactly invertible CInC convolutions for PyTorch.

    import cinc_kernels as ck
    y = ck.cinc_conv2d(x, weight, bias)              # (B, C, H, W) -> (B, C, H, W)
    x = ck.cinc_conv2d_inverse(y, weight, bias)      # wavefront solve
    ld = ck.cinc_logdet(weight, H, W)                # 0-dim tensor

See docs/spec.md for the math and README.md for the tour. ``import cinc_kernels`` does not import Triton: the
``triton`` backend loads the first time it is asked for.
"""
from . import reference, registration  # noqa: F401  (registration: fake + autograd for torch.ops.cinc.*)
from ._extension import build_info
from ._version import __version__ as __version__
from .backends import available_backends, register_backend
from .conditioning import inverse_gain
from .functional import cinc_conv2d, cinc_conv2d_inverse, cinc_conv2d_inverse_transpose, cinc_logdet
from . import torch_backend as _torch_backend  # noqa: F401  (registers backend="torch", after the compiled ones)

from .nn import LAYERS, AutoregressiveConv2d, CInCConv2d, EmergingConv2d, FInCConv2d, InvConv1x1

__all__ = [
    "AutoregressiveConv2d",
    "CInCConv2d",
    "EmergingConv2d",
    "FInCConv2d",
    "InvConv1x1",
    "LAYERS",
    "available_backends",
    "build_info",
    "cinc_conv2d",
    "cinc_conv2d_inverse",
    "cinc_conv2d_inverse_transpose",
    "cinc_logdet",
    "inverse_gain",
    "reference",
    "register_backend",
]
