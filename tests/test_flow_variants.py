"""The flow step's variants (docs/spec.md §4): the authors' exact step (``permutation="paper"``), against a direct
transcription of their convolution. Tiny float64 problems."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cinc_kernels.flow.layers import FlowStep

pytestmark = pytest.mark.usefixtures("one_thread")


def _their_kernel(channels: int, generator: torch.Generator) -> torch.Tensor:
    """The authors' 3×3 kernel in TensorFlow's layout ``(kh, kw, in, out)``: every tap N(0, 0.02²) plus the
    identity on the centre tap, then masked; the centre tap (bottom right, ``[2, 2]``) keeps the entries whose
    input channel is ≥ the output channel."""
    w = 0.02 * torch.randn(3, 3, channels, channels, generator=generator, dtype=torch.float64)
    w[2, 2] += torch.eye(channels, dtype=torch.float64)
    w = w + 0.3 * torch.randn(w.shape, generator=generator, dtype=w.dtype)  # away from the identity
    mask = torch.ones(3, 3, channels, channels, dtype=torch.float64)
    inputs, outputs = torch.meshgrid(torch.arange(channels), torch.arange(channels), indexing="ij")
    mask[2, 2] = (inputs >= outputs).to(torch.float64)
    return w * mask


def _their_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Their convolution: two rows and two columns of zero padding top and left, then a valid 3×3 correlation
    (output pixel ``(i, j)`` reads rows ``i−2…i`` and columns ``j−2…j``)."""
    return F.conv2d(F.pad(x, (2, 0, 2, 0)), kernel.permute(3, 2, 0, 1)) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("coupling,channels,size", [("affine", 6, (5, 7)), ("quad", 4, (3, 3)), ("quad", 9, (1, 6))])
def test_paper_step_is_the_authors_convolution_entry_for_entry(coupling, channels, size):
    g = torch.Generator().manual_seed(channels)
    torch.manual_seed(channels)
    step = FlowStep(channels, 5, "cinc", coupling, permutation="paper").double().eval()
    kernel = _their_kernel(channels, g)
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    with torch.no_grad():
        # Ours is lower triangular: weight[o, i] = theirs[C−1−o, C−1−i] (both channel axes reversed).
        step.conv.weight.copy_(kernel.permute(3, 2, 0, 1).flip(0, 1))
        step.conv.bias.copy_(bias.flip(0))
        for p in step.coupling.parameters():  # a coupling that is not near the identity
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(3, channels, *size, generator=g, dtype=torch.float64)
    y, logdet = step(x)  # ActNorm in eval mode with zero parameters: the identity
    h = _their_conv(x, kernel, bias)
    expected, coupling_logdet = step.coupling(h)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    # Their log-determinant: H·W·Σ log|w_cc| over the centre tap's diagonal.
    their_logdet = size[0] * size[1] * kernel[2, 2].diagonal().abs().log().sum()
    assert torch.allclose(logdet, coupling_logdet + their_logdet, rtol=0, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: step(v)[0], x[:1]).reshape(x[0].numel(), -1)
    assert abs(float(torch.linalg.slogdet(jac).logabsdet - logdet[0].detach())) < 1e-9
    assert torch.allclose(step.inverse(y), x, rtol=0, atol=1e-10)


def test_reverse_step_is_the_paper_step_after_one_more_reversal():
    # R·M = (R·M·R)·R: the default step equals the authors' step applied to the channel-reversed input, with
    # ActNorm's per-channel parameters reversed to match. So the two differ by one reversal per step.
    channels = 6
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    ours = FlowStep(channels, 5, "cinc", "quad", permutation="reverse").double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    paper = FlowStep(channels, 5, "cinc", "quad", permutation="paper").double().eval()
    state = ours.state_dict()
    for name in ("actnorm.bias", "actnorm.log_scale"):
        state[name] = state[name].flip(1)
    paper.load_state_dict(state)
    x = torch.randn(2, channels, 4, 5, generator=g, dtype=torch.float64)
    y_ours, ld_ours = ours(x)
    y_paper, ld_paper = paper(x.flip(1))
    assert torch.allclose(y_ours, y_paper, rtol=0, atol=1e-12)
    assert torch.allclose(ld_ours, ld_paper, rtol=0, atol=1e-12)
    assert not torch.allclose(ours(x)[0], paper(x)[0], atol=1e-3), "the steps are different maps"
