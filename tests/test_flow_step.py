"""The flow step's permutation (docs/spec.md §4: the paper's step is conv → channel reversal → coupling) and the
bundled photographs data set. Tiny models (4×4 and 8×8 images, one step per level): seconds on a loaded 2-core CPU.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cinc_kernels import reference
from cinc_kernels.flow import CInCFlow
from cinc_kernels.flow.data import load_data
from cinc_kernels.flow.layers import PERMUTATIONS, FlowStep
from cinc_kernels.flow.model import flatten_latents
from cinc_kernels.flow.train import CHECKPOINT_FORMAT, TrainConfig, load_model, train
from cinc_kernels.nn import LAYERS

CONVS = sorted(LAYERS)


# Tiny problems: extra OpenMP threads only spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _flow(conv, permutation, coupling="quad", seed=0) -> CInCFlow:
    torch.manual_seed(seed)
    model = CInCFlow(1, 2, 1, 6, conv=conv, coupling=coupling, image_size=(4, 8), permutation=permutation).double()
    g = torch.Generator().manual_seed(seed + 1)
    model.train()(torch.rand(8, 1, 4, 8, generator=g, dtype=torch.float64))  # ActNorm's initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _paper_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The authors' orientation written out directly: a k×k correlation over the top-left neighbourhood whose
    centre tap is upper triangular (output c reads inputs c…C−1), applied as a plain zero-padded convolution."""
    k = weight.shape[-1]
    return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), weight)


@pytest.mark.parametrize("channels,k,size", [(4, 3, (5, 7)), (7, 2, (3, 3)), (1, 1, (2, 5))])
def test_conv_then_reversal_is_the_papers_upper_triangular_conv(channels, k, size):
    g = torch.Generator().manual_seed(channels)
    ours = reference.masked_weight(torch.randn(channels, channels, k, k, generator=g, dtype=torch.float64))
    paper = ours.flip(0, 1)  # both channel axes flipped, as the authors' mask[::-1, ::-1, ::-1, ::-1] does
    centre = paper[:, :, k - 1, k - 1]
    assert torch.equal(centre, centre.triu()), "the flipped centre tap must be upper triangular"
    x = torch.randn(2, channels, *size, generator=g, dtype=torch.float64)
    step_conv_then_reverse = reference.forward(x, ours).flip(1)
    # Entry for entry: the map x ↦ R·M(W)·x is the paper's conv of the channel-reversed image.
    assert torch.allclose(step_conv_then_reverse, _paper_conv(x.flip(1), paper), rtol=0, atol=1e-12)
    jac_ours = torch.autograd.functional.jacobian(lambda v: reference.forward(v, ours).flip(1), x[:1])
    jac_paper = torch.autograd.functional.jacobian(lambda v: _paper_conv(v.flip(1), paper), x[:1])
    assert torch.equal(jac_ours != 0, jac_paper != 0)
    assert torch.allclose(jac_ours, jac_paper, rtol=0, atol=1e-12)


def _centre_dependence(step: FlowStep, channels: int) -> torch.Tensor:
    """``|∂ coupling input[o] / ∂ conv input[i]|`` at one pixel (the centre tap alone): ``(C, C)``."""
    x = torch.randn(1, channels, 1, 1, dtype=torch.float64)

    def to_coupling(v):
        h, _ = step.conv(v)
        return h.flip(1) if step.permute is not None else h

    return torch.autograd.functional.jacobian(to_coupling, x).reshape(channels, channels).abs()


def test_reversal_lets_the_conditioning_half_see_the_transformed_half():
    channels = 6
    torch.manual_seed(0)
    for permutation, expected in (("reverse", True), ("none", False)):
        step = FlowStep(channels, 4, "cinc", "affine", permutation=permutation).double()
        with torch.no_grad():
            step.conv.weight.add_(0.3 * torch.randn_like(step.conv.weight))
        dep = _centre_dependence(step, channels)
        # The affine coupling conditions on channels 0…C/2−1 and transforms C/2…C−1.
        sees = bool((dep[: channels // 2, channels // 2:] > 0).any())
        assert sees is expected, permutation


def test_default_step_is_the_papers_and_every_permutation_is_known():
    assert PERMUTATIONS[0] == "reverse"
    assert CInCFlow(1, 1, 1, 4).config["permutation"] == "reverse"
    assert TrainConfig().permutation == "reverse"
    step = FlowStep(4, 4, "cinc", "quad", permutation="1x1")
    assert isinstance(step.mix, LAYERS["1x1"]) and step.permute is None
    assert [type(m).__name__ for m in step._layers()] == ["ActNorm", "InvConv1x1", "CInCConv2d", "QuadCoupling"]
    with pytest.raises(ValueError, match="permutation must be one of reverse, none, 1x1, paper"):
        FlowStep(4, 4, permutation="rotate")


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("conv", CONVS)
def test_every_conv_and_permutation_round_trips_with_exact_logdet_and_samples(conv, permutation):
    model = _flow(conv, permutation)
    x = torch.rand(3, 1, 4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(model.decode(model.encode(x)), x, rtol=0, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: flatten_latents(model.encode(v)), x[:1]).reshape(32, 32)
    assert abs(float(torch.linalg.slogdet(jac).logabsdet - model.transform(x[:1])[1][0].detach())) < 1e-8
    images = model.sample(2, 0.7, generator=torch.Generator().manual_seed(2))
    assert images.shape == (2, 1, 4, 8) and torch.isfinite(images).all()
    # Sampling is decode of drawn latents: re-encoding the samples gives latents that decode to them again.
    assert torch.allclose(model.decode(model.encode(images)), images, rtol=0, atol=1e-10)


def test_checkpoint_without_the_field_loads_with_the_step_it_was_trained_with(tmp_path):
    old = _flow("cinc", "none").float()
    config = dict(old.config)
    del config["permutation"]  # written before the step had a permutation
    path = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": config, "model": old.state_dict(), "step": 1},
               path)
    model, _ = load_model(str(path))
    assert model.config["permutation"] == "none"
    x = torch.rand(2, 1, 4, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.log_prob(x), old.log_prob(x))
    # The field matters: the same weights in the new default step give another density.
    reversed_step = CInCFlow.from_config(dict(config, permutation="reverse"))
    reversed_step.load_state_dict(old.state_dict())
    assert not torch.allclose(reversed_step.eval().log_prob(x), old.log_prob(x))
    assert CInCFlow.upgrade_config(dict(config, permutation="1x1"))["permutation"] == "1x1"


# ------------------------------------------------------------------------------------------------------------
# photos


def test_photos_are_bundled_disjoint_and_described():
    data = load_data("photos", image_size=16)
    assert data.shape == (3, 16, 16) and data.num_levels == 256
    info = data.info
    assert info["train_patches"] == len(data.train) > info["test_patches"] == len(data.test) > 0
    names = [s["name"] for s in info["sources"]]
    assert "sklearn:china.jpg" in names and "sklearn:flower.jpg" in names
    for s in info["sources"]:
        train_end, test_start = s["train_columns"][1], s["test_columns"][0]
        assert train_end == test_start and s["test_columns"][1] == s["width"]
        assert (s["width"] - test_start) % 16 == 0, "the test strip holds whole patches"
    assert sum(s["train_patches"] for s in info["sources"]) == len(data.train)
    # No training patch equals a test patch (disjoint columns of each photo); flat ones (astronaut's black
    # background) repeat everywhere and say nothing about the split.
    train = {bytes(p.numpy()) for p in data.train.base.images}
    textured = [p for p in data.test.images if p.min() != p.max()]
    assert len(textured) > 0.9 * len(data.test)
    assert not any(bytes(p.numpy()) in train for p in textured)


def test_photos_training_images_are_flipped_at_random():
    data = load_data("photos", image_size=8)
    base = data.train.base
    torch.manual_seed(0)
    flipped = [not torch.equal(data.train[i][0], base[i][0]) for i in range(64)]
    assert 10 < sum(flipped) < 54
    for i in range(64):
        image = data.train[i][0]
        assert torch.equal(image, base[i][0]) or torch.equal(image, base[i][0].flip(-1))
    assert torch.equal(data.test[0][0], data.test[0][0])  # the test split is fixed


def test_photos_image_size_and_errors():
    assert load_data("photos").shape == (3, 32, 32)
    with pytest.raises(ValueError, match="image_size"):
        load_data("photos", image_size=1)
    assert load_data("photos", image_size=8, n_bits=5).num_levels == 32


def test_a_photos_run_stores_its_split_in_the_config(tmp_path):
    cfg = TrainConfig(name="p", out_dir=str(tmp_path / "p"), data="photos", image_size=8, preset=None, levels=2,
                      steps_per_level=1, hidden_channels=4, conv="cinc", steps=2, batch_size=4, eval_every=2,
                      sample_every=2, checkpoint_every=2, n_samples=4, temperatures=(0.7,))
    data = load_data("photos", image_size=8)
    small = type(data)(data.name, torch.utils.data.Subset(data.train, range(16)),
                       torch.utils.data.Subset(data.test, range(8)), data.num_levels, data.shape, data.classes,
                       data.info)
    train(cfg, progress=False, data=small)
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["data"] == "photos" and saved["permutation"] == "reverse"
    assert saved["data_info"]["test_patches"] == data.info["test_patches"]
    assert {s["name"] for s in saved["data_info"]["sources"]} >= {"sklearn:china.jpg", "sklearn:flower.jpg"}
