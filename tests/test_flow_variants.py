"""The flow step's variants (docs/spec.md §4): the authors' exact step (``permutation="paper"``), against a direct
transcription of their convolution; the fixed random channel shuffle; CInCConv2d's mixing initialisation. Tiny
float64 problems."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cinc_kernels import reference
from cinc_kernels.flow import CInCFlow
from cinc_kernels.flow.layers import FlowStep, ShuffleChannels
from cinc_kernels.nn import INITS, CInCConv2d

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


# ------------------------------------------------------------------------------------------------------------
# shuffle


def test_shuffle_is_a_fixed_permutation_with_an_exact_inverse():
    torch.manual_seed(0)
    shuffle = ShuffleChannels(11)
    perm = shuffle.perm
    assert sorted(perm.tolist()) == list(range(11)) and perm.tolist() != list(range(11))
    assert list(shuffle.parameters()) == []
    x = torch.randn(3, 11, 2, 5, dtype=torch.float64)
    y, logdet = shuffle(x)
    assert torch.equal(y, x[:, perm]) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(shuffle.inverse(y), x)
    assert torch.equal(shuffle(x[:0])[0], x[:0])
    torch.manual_seed(0)
    assert torch.equal(ShuffleChannels(11).perm, perm), "reproducible under torch.manual_seed"


def test_shuffle_is_saved_with_the_weights_and_differs_between_steps(tmp_path):
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 3, 6, conv="cinc", coupling="quad", image_size=8, permutation="shuffle").double().eval()
    perms = [step.permute.perm for level in model.levels for step in level.steps]
    assert len({tuple(p.tolist()) for p in perms}) > 1
    state = model.state_dict()
    assert torch.equal(state["levels.0.steps.0.permute.perm"], perms[0])
    path = tmp_path / "m.pt"
    torch.save(state, path)
    torch.manual_seed(1)  # a fresh model draws other permutations; loading restores the saved ones
    fresh = CInCFlow.from_config(model.config).double().eval()
    assert not all(torch.equal(a.permute.perm, b.permute.perm)
                   for a, b in zip(fresh.levels[0].steps, model.levels[0].steps))
    fresh.load_state_dict(torch.load(path))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(fresh.log_prob(x), model.log_prob(x))
    assert torch.allclose(model.decode(model.encode(x)), x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# init


def test_inits_are_known_and_checked():
    assert INITS == ("identity", "rotation")
    with pytest.raises(ValueError, match="init must be one of identity, rotation"):
        CInCConv2d(4, init="orthogonal")


@pytest.mark.parametrize("channels,k,unit_diagonal", [(7, 3, False), (12, 2, True), (1, 3, False), (5, 1, False)])
def test_rotation_init_mixes_at_log_determinant_zero(channels, k, unit_diagonal):
    torch.manual_seed(channels)
    layer = CInCConv2d(channels, k, unit_diagonal=unit_diagonal, init="rotation")
    centre = reference.masked_weight(layer.weight.detach().double(), unit_diagonal)[:, :, k - 1, k - 1]
    assert torch.equal(centre.diagonal(), torch.ones(channels, dtype=torch.float64))
    assert torch.equal(centre, centre.tril())
    assert float(layer.logdet(5, 3).detach()) == 0.0
    if channels > 1:
        # It mixes: far from the identity, with entries up to 1 (partial pivoting bounds them there).
        off = centre - torch.eye(channels, dtype=torch.float64)
        assert float(off.abs().max()) > 0.3 and float(off.abs().max()) <= 1.0
        assert int((off.abs() > 0.05).sum()) >= channels * (channels - 1) // 4
    x = torch.randn(2, channels, 5, 3, dtype=torch.float64)
    double = layer.double()
    y, logdet = double(x)
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(double.inverse(y), x, rtol=0, atol=1e-10)
    assert "init='rotation'" in repr(layer)


def test_inits_are_reproducible_and_the_default_draws_as_before():
    torch.manual_seed(3)
    a = CInCConv2d(6, init="rotation").weight.detach()
    torch.manual_seed(3)
    assert torch.equal(CInCConv2d(6, init="rotation").weight.detach(), a)
    # The default is the identity plus N(0, init_scale²) on every free entry, from the same draw as before the
    # option existed (so seeded runs reproduce).
    torch.manual_seed(3)
    w = 1e-2 * torch.randn(6, 6, 3, 3)
    w[:, :, 2, 2] += torch.eye(6)
    torch.manual_seed(3)
    assert torch.equal(CInCConv2d(6).weight.detach(), reference.masked_weight(w.double()).float())
    # The off-centre taps are the same draw in both inits.
    torch.manual_seed(3)
    assert torch.equal(a[:, :, :2], CInCConv2d(6, init="identity").weight.detach()[:, :, :2])


def test_rotation_init_in_a_flow_round_trips():
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 2, 6, conv="cinc", coupling="affine", image_size=8, permutation="shuffle",
                     conv_kwargs={"init": "rotation"}).double().eval()
    assert all(step.conv.init == "rotation" for level in model.levels for step in level.steps)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(model.decode(model.encode(x)), x, rtol=0, atol=1e-10)
