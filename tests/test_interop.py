"""The adapters of ``cinc_kernels.interop`` inside normflows, FrEIA and zuko (docs/spec.md §1–§3): round trip,
log-determinant against the autograd Jacobian, sampling, training, gradients, and Glow-1×1 parity with normflows."""
import math
import sys

import pytest
import torch

import cinc_kernels as ck
from cinc_kernels import interop

nf = pytest.importorskip("normflows", reason="normflows is not installed (pip install cinc_kernels[test])")
Ff = pytest.importorskip("FrEIA.framework", reason="FrEIA is not installed (pip install cinc_kernels[test])")
zuko = pytest.importorskip("zuko", reason="zuko is not installed (pip install cinc_kernels[test])")

CONVS = ["cinc", "emerging", "autoregressive", "glow1x1", "finc"]
# float32 round trips of near-identity layers on tiny images.
TOL32 = dict(rtol=1e-4, atol=1e-5)


def _layer(conv, channels, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    layer = interop.make_layer(conv, channels, **kwargs)
    # Larger than the default near-identity start, so the Jacobian test sees real off-centre taps.
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype)


def _jacobian_logdet(f, x):
    """``log|det ∂f/∂x|`` of a map from one image ``(1, C, H, W)`` to one image, by autograd."""
    jac = torch.autograd.functional.jacobian(f, x)
    return torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()))[1]


def _assert_trains(params, loss_fn, steps=15):
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def _assert_free_gradients(layer):
    """Every free entry of the layer (``free_masks``) gets a non-zero gradient somewhere, masked ones none."""
    masks = layer.free_masks()
    named = dict(layer.named_parameters())
    assert named, "layer without parameters"
    for name, p in named.items():
        assert p.grad is not None, name
        mask = masks.get(name.replace(".", "_"), masks.get(name))
        if mask is not None:
            assert torch.all(p.grad[mask == 0] == 0), name
            assert p.grad[mask != 0].abs().sum() > 0, name
        else:
            assert p.grad.abs().sum() > 0, name


def _data(n, shape, seed=1):
    """Correlated images: a fixed blur of noise plus an offset, so a convolution can lower the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    return 0.5 * x + 0.5 * x.roll(1, dims=-1) + 0.3


# normflows

def _nf_model(conv, shape, dtype=torch.float32):
    flows = [interop.NormflowsConv(_layer(conv, shape[0], dtype))]
    q0 = nf.distributions.DiagGaussian(shape, trainable=False)
    return nf.NormalizingFlow(q0, flows).to(dtype)


@pytest.mark.parametrize("conv", CONVS)
def test_normflows_round_trip_and_logdet_signs(conv):
    model = _nf_model(conv, (4, 5, 3))
    x = torch.randn(3, 4, 5, 3).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    z, ld_density = model.inverse_and_log_det(x)
    x2, ld_sampling = model.forward_and_log_det(z)
    torch.testing.assert_close(x2, x, **TOL32)
    torch.testing.assert_close(ld_sampling, -ld_density, **TOL32)
    assert ld_density.shape == (3,)


@pytest.mark.parametrize("conv", CONVS)
def test_normflows_logdet_matches_autograd(conv):
    flow = _nf_model(conv, (2, 3, 3), torch.float64).flows[0]
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    z, ld = flow.inverse(x)
    torch.testing.assert_close(ld[0], _jacobian_logdet(lambda t: flow.inverse(t)[0], x))
    _, ld_back = flow(z)
    torch.testing.assert_close(ld_back[0], _jacobian_logdet(lambda t: flow(t)[0], z))


def test_normflows_sample_log_prob_and_training():
    shape = (3, 4, 4)
    model = _nf_model("cinc", shape)
    x, log_q = model.sample(5)
    assert x.shape == (5, *shape) and torch.isfinite(x).all()
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=1e-4, atol=1e-3)

    data = _data(32, shape)
    _assert_trains(model.parameters(), lambda: model.forward_kld(data))
    model.zero_grad()
    model.forward_kld(data).backward()
    _assert_free_gradients(model.flows[0].layer)


def test_normflows_empty_batch():
    flow = _nf_model("cinc", (2, 3, 3)).flows[0]
    z, ld = flow.inverse(torch.randn(0, 2, 3, 3))
    assert z.shape == (0, 2, 3, 3) and ld.shape == (0,)


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")
def test_glow_1x1_parity_with_normflows():
    C = 5
    ours = ck.InvConv1x1(C, bias=False).double()
    theirs = nf.flows.Invertible1x1Conv(C, use_lu=True).double()
    with torch.no_grad():
        theirs.P.copy_(ours.permutation)
        theirs.L.copy_(ours.lower + 0.1 * torch.randn_like(ours.lower).tril(-1))
        ours.lower.copy_(theirs.L.tril(-1))
        theirs.U.copy_(ours.upper)
        theirs.sign_S.copy_(ours.sign)
        theirs.log_S.copy_(ours.log_scale + 0.1 * torch.randn_like(ours.log_scale))
        ours.log_scale.copy_(theirs.log_S)
    x = torch.randn(2, C, 3, 7, dtype=torch.float64)
    y_theirs, ld_theirs = theirs.inverse(x)  # normflows' density direction: z = W x
    y_ours, ld_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs)
    torch.testing.assert_close(ld_ours, ld_theirs.expand(2))
    wrapped = interop.NormflowsConv(ours)
    x_theirs, ldb_theirs = theirs(y_theirs)
    x_ours, ldb_ours = wrapped(y_theirs)
    torch.testing.assert_close(x_ours, x_theirs)
    torch.testing.assert_close(x_ours, x)
    torch.testing.assert_close(ldb_ours, ldb_theirs.expand(2))


# FrEIA

def _inn(conv, shape, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    inn = Ff.SequenceINN(*shape)
    inn.append(interop.FrEIAConv, conv=conv, **kwargs)
    inn.append(interop.FrEIAConv, conv="cinc", kernel_size=2)
    with torch.no_grad():
        for p in inn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return inn.to(dtype)


@pytest.mark.parametrize("conv", CONVS)
def test_freia_round_trip_and_logdet(conv):
    inn = _inn(conv, (4, 3, 5))
    x = torch.randn(2, 4, 3, 5)
    z, jac = inn(x)
    x2, jac_rev = inn(z, rev=True)
    torch.testing.assert_close(x2, x, **TOL32)
    torch.testing.assert_close(jac_rev, -jac, **TOL32)

    inn64 = _inn(conv, (2, 3, 3), torch.float64)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(inn64(x)[1][0], _jacobian_logdet(lambda t: inn64(t)[0], x))


def test_freia_sampling_and_training():
    shape = (3, 4, 4)
    inn = _inn("cinc", shape, parametrization="contractive")
    samples, _ = inn(torch.randn(6, *shape), rev=True)
    assert samples.shape == (6, *shape) and torch.isfinite(samples).all()

    data = _data(32, shape)

    def nll():
        z, jac = inn(data)
        return (0.5 * z.pow(2).flatten(1).sum(1) - jac).mean()

    _assert_trains(inn.parameters(), nll)
    inn.zero_grad()
    nll().backward()
    for module in inn.module_list:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.layer.parameters())


def test_freia_rejects_bad_arguments():
    with pytest.raises(ValueError, match="conv"):
        Ff.SequenceINN(2, 3, 3).append(interop.FrEIAConv, conv="nope")
    with pytest.raises(ValueError, match="dims_in"):
        interop.FrEIAConv([(4,)])
    with pytest.raises(ValueError, match="dims_c"):
        interop.FrEIAConv([(2, 3, 3)], dims_c=[(1,)])
    with pytest.raises(TypeError, match="conv"):
        interop.make_layer(3, 2)


# zuko

def _zuko_flow(shape, convs=("cinc", "emerging"), dtype=torch.float32):
    return interop.image_flow([interop.ZukoConv(_layer(c, shape[0])) for c in convs], shape).to(dtype)


def test_zuko_round_trip_log_prob_and_logdet():
    shape = (2, 3, 3)
    flow = _zuko_flow(shape, dtype=torch.float64)
    dist = flow()
    x = torch.randn(4, *shape, dtype=torch.float64)
    z, ladj = dist.transform.call_and_ladj(x)
    torch.testing.assert_close(dist.transform.inv(z), x)
    standard = -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)
    torch.testing.assert_close(dist.log_prob(x), standard + ladj)
    torch.testing.assert_close(ladj[0], _jacobian_logdet(lambda t: dist.transform(t), x[:1]))
    inv = dist.transform.inv
    torch.testing.assert_close(inv.log_abs_det_jacobian(z, x), -ladj)


def test_zuko_sampling_and_training():
    shape = (3, 4, 4)
    flow = _zuko_flow(shape, convs=("cinc", "finc"))
    samples = flow().sample((2, 3))
    assert samples.shape == (2, 3, *shape) and torch.isfinite(samples).all()
    x, log_p = flow().rsample_and_log_prob((5,))
    torch.testing.assert_close(flow().log_prob(x), log_p, rtol=1e-4, atol=1e-3)

    data = _data(32, shape)
    _assert_trains(flow.parameters(), lambda: -flow().log_prob(data).mean())
    flow.zero_grad()
    (-flow().log_prob(data).mean()).backward()
    _assert_free_gradients(flow.transform.transforms[0].layer)


def test_adapters_reject_a_module_without_inverse():
    """Every adapter that takes a layer checks it up front (``ZukoConvTransform(nn.Identity())`` failed later with
    "not enough values to unpack")."""
    for adapter in (interop.NormflowsConv, interop.ZukoConv, interop.ZukoConvTransform):
        for module in (torch.nn.Conv2d(2, 2, 3), torch.nn.Identity()):
            with pytest.raises(TypeError, match="layer must be an invertible convolution"):
                adapter(module)


def test_zuko_rejects_context():
    with pytest.raises(ValueError, match="c must be None"):
        interop.ZukoConv(_layer("cinc", 2))(torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        interop.image_flow([], (2, 3))


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setattr(interop, "_BUILT", {})
    monkeypatch.setitem(sys.modules, "zuko", None)
    with pytest.raises(ImportError, match=r"cinc_kernels\[interop\]"):
        interop.ZukoConv
    with pytest.raises(AttributeError):
        interop.NoSuchAdapter
