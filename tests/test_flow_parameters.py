"""``num_parameters()`` counts every free entry exactly once, for every layer and for whole flows: it equals the
number of parameter entries that receive a non-zero gradient (docs/spec.md §3, §4). Tiny float64 models."""
from __future__ import annotations

import pytest
import torch

from cinc_kernels.flow import CInCFlow
from cinc_kernels.flow.layers import COUPLINGS, PERMUTATIONS, CouplingNet
from cinc_kernels.flow.model import flatten_latents
from cinc_kernels.nn import LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")

# (conv, constructor kwargs): every layer with its defaults, plus the variants whose free entries differ.
LAYER_CASES = [(name, {}) for name in sorted(LAYERS)] + [
    ("cinc", {"bias": False, "unit_diagonal": True}),
    ("cinc", {"parametrization": "contractive"}),
    ("cinc", {"init": "rotation"}),
    ("cinc", {"init": "rotation", "parametrization": "contractive"}),
    ("emerging", {"kernel_size": 3, "unit_diagonal": True}),
    ("autoregressive", {"kernel_size": 5, "bias": False}),
]


@torch.no_grad()
def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter off its initial value without touching a masked entry: entries that are zero stay zero
    unless the whole tensor is zero (biases, zero-initialised convolutions), which gets noise everywhere. The
    layers store their masked entries as zeros, so this never sets one."""
    for p in module.parameters():
        noise = 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.add_(noise * (p != 0) if bool(p.any()) else noise)


def _entries_with_gradient(module: torch.nn.Module) -> int:
    return sum(int((p.grad != 0).sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,kwargs", LAYER_CASES, ids=lambda v: str(v))
def test_a_layer_counts_the_entries_that_move_its_output(name, kwargs):
    g = torch.Generator().manual_seed(len(name))
    torch.manual_seed(1)
    channels = 5
    layer = LAYERS[name](channels, **kwargs).double()
    _perturb(layer, g)
    x = torch.randn(3, channels, 4, 6, generator=g, dtype=torch.float64)
    y, logdet = layer(x)
    loss = (torch.randn(y.shape, generator=g, dtype=y.dtype) * y).sum() + 0.3 * logdet.sum()
    loss.backward()
    assert layer.num_parameters() == _entries_with_gradient(layer) > 0


def _check_flow(model: CInCFlow, g: torch.Generator) -> None:
    # 16×16 images: the last level works on 4×4, where every tap of a 5×5 kernel reads an image pixel somewhere
    # (on a smaller image the taps that only ever read padding get no gradient and would not be counted).
    model.train()(torch.rand(8, 1, 16, 16, generator=g, dtype=torch.float64))  # ActNorm's initialisation
    _perturb(model, g)
    with torch.no_grad():
        # A ReLU unit that is off on every pixel of the batch passes no gradient to its free weights: shrink the
        # hidden weights and raise their biases so that every unit is on (the weights stay distinct and free).
        for net in model.modules():
            if isinstance(net, CouplingNet):
                for hidden in (net.net[0], net.net[2]):
                    hidden.weight.mul_(0.1)
                    hidden.bias.add_(1.0)
    model.zero_grad()
    x = torch.rand(4, 1, 16, 16, generator=g, dtype=torch.float64)
    latents, logdet, log_prior = model.transform(x)
    z = flatten_latents(latents)
    loss = (torch.randn(z.shape, generator=g, dtype=z.dtype) * z).sum() + 0.3 * logdet.sum() + log_prior.sum()
    loss.backward()
    assert model.num_parameters() == _entries_with_gradient(model)


@pytest.mark.parametrize("coupling", sorted(COUPLINGS))
@pytest.mark.parametrize("name,kwargs", LAYER_CASES, ids=lambda v: str(v))
def test_a_flow_counts_each_free_entry_once(name, kwargs, coupling):
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 1, 6, conv=name, coupling=coupling, image_size=16, conv_kwargs=kwargs).double()
    _check_flow(model, torch.Generator().manual_seed(3))
    # The flow's count is its convolutions' counts plus every entry of everything else.
    convs = [step.conv for level in model.levels for step in level.steps]
    rest = {id(p) for p in model.parameters()} - {id(p) for c in convs for p in c.parameters()}
    assert model.num_parameters() == (sum(c.num_parameters() for c in convs)
                                      + sum(p.numel() for p in model.parameters() if id(p) in rest))


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_every_step_permutation_counts_each_free_entry_once(permutation):
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 2, 6, conv="emerging", coupling="quad", image_size=16, permutation=permutation).double()
    _check_flow(model, torch.Generator().manual_seed(4))


def test_emerging_is_counted_once_in_a_flow():
    torch.manual_seed(0)
    model = CInCFlow(3, 1, 1, 4, conv="emerging", coupling="affine")
    conv = model.levels[0].steps[0].conv
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) - (
        sum(p.numel() for p in conv.parameters()) - conv.num_parameters())
