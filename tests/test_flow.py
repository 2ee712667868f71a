"""The CInC Flow model (docs/spec.md §4), its training loop and its command line.

Models here are tiny (a few hundred to a few thousand parameters, 4×4 to 8×8 images) so the whole file runs in
about a minute or two on a loaded 2-core machine. Every conv of ``cinc_kernels.nn.LAYERS`` is covered by name.
"""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch

from cinc_kernels.flow import (
    ActNorm,
    AffineCoupling,
    CInCFlow,
    QuadCoupling,
    Squeeze,
    flatten_latents,
    unflatten_latents,
)
from cinc_kernels.flow.data import ImageData, LevelDataset, load_data
from cinc_kernels.flow.train import TrainConfig, atomic_save, evaluate, load_checkpoint, load_model, train
from cinc_kernels.nn import LAYERS

CONVS = sorted(LAYERS)
COUPLINGS = ("affine", "quad")


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(module: torch.nn.Module, scale: float, generator: torch.Generator) -> None:
    """Move every parameter off its (near-identity, zero-initialised) start so that no part is trivially exact."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _tiny_flow(conv="cinc", coupling="quad", in_channels=1, size=(8, 8), levels=2, steps=1, hidden=8,
               dtype=torch.float64, seed=0, perturb=0.05) -> CInCFlow:
    torch.manual_seed(seed)
    model = CInCFlow(in_channels, levels, steps, hidden, conv=conv, coupling=coupling, image_size=size).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()(torch.rand(16, in_channels, *size, generator=g, dtype=torch.float64).to(dtype))  # ActNorm init
    _perturb(model, perturb, g)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# building blocks


def test_squeeze_layout_and_inverse():
    x = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(0))
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 3, 2) and torch.equal(logdet, torch.zeros(2))
    # Output channel 4c + 2a + b holds input channel c at offset (a, b) of each 2×2 cell.
    for c in range(3):
        for a in range(2):
            for b in range(2):
                assert torch.equal(y[:, 4 * c + 2 * a + b], x[:, c, a::2, b::2])
    assert torch.equal(Squeeze().inverse(y), x)
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_actnorm_data_dependent_init_happens_once():
    g = torch.Generator().manual_seed(1)
    layer = ActNorm(3)
    x = 2.0 + 3.0 * torch.randn(64, 3, 5, 7, generator=g, dtype=torch.float64)
    layer.double()
    y, logdet = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(logdet, 35 * layer.log_scale.sum().expand(64))
    bias = layer.bias.detach().clone()
    layer(x * 5)  # a second batch must not re-initialise
    assert torch.equal(layer.bias, bias)
    fresh = ActNorm(3).double()
    fresh.load_state_dict(layer.state_dict())  # the flag travels with the weights: a resumed run keeps them
    fresh(x * 5)
    assert torch.equal(fresh.bias, bias)
    assert torch.allclose(layer.inverse(y), x, atol=1e-12)


@pytest.mark.parametrize("cls, blocks", [(AffineCoupling, 2), (QuadCoupling, 4)])
@pytest.mark.parametrize("channels", [4, 7])
def test_coupling_formula_inverse_and_structure(cls, blocks, channels):
    g = torch.Generator().manual_seed(channels)
    layer = cls(channels, hidden_channels=6).double()
    _perturb(layer, 0.3, g)
    x = torch.randn(3, channels, 5, 3, generator=g, dtype=torch.float64)
    y, logdet = layer(x)
    sizes = layer.sizes
    assert len(sizes) == blocks and sum(sizes) == channels
    xs, ys = x.split(sizes, 1), y.split(sizes, 1)
    assert torch.equal(ys[0], xs[0])
    # Block i: y_i = (x_i + t(x_1..x_{i-1})) · sigmoid(h + 2), its log-scale summed into the log-determinant.
    expected_logdet = torch.zeros(3, dtype=torch.float64)
    for i in range(1, blocks):
        t, h = layer.nets[i - 1](torch.cat(xs[:i], 1)).chunk(2, 1)
        s = torch.sigmoid(h + 2)
        assert torch.allclose(ys[i], (xs[i] + t) * s, atol=1e-12)
        expected_logdet += torch.log(s).flatten(1).sum(1)
    assert torch.allclose(logdet, expected_logdet, atol=1e-10)
    # The inverse is exact: it recovers x1, x2, … in order, each from the blocks already recovered.
    assert torch.allclose(layer.inverse(y), x, rtol=0, atol=1e-12)


def test_quad_coupling_jacobian_is_block_triangular():
    g = torch.Generator().manual_seed(3)
    layer = QuadCoupling(4, hidden_channels=4).double()
    _perturb(layer, 0.3, g)
    x = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x).reshape(16, 16)
    # Channel-major flattening: rows/cols 4c … 4c+3 belong to block c. Block i must not depend on later blocks.
    for i in range(4):
        assert torch.count_nonzero(jac[4 * i:4 * i + 4, 4 * (i + 1):]) == 0
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, layer(x)[1][0], atol=1e-10)


# ------------------------------------------------------------------------------------------------------------
# the whole model


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("conv", CONVS)
def test_whole_model_is_invertible(conv, coupling):
    model = _tiny_flow(conv, coupling, in_channels=3, size=(4, 8))
    x = torch.rand(3, 3, 4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    latents = model.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes()
    assert torch.allclose(model.decode(latents), x, rtol=0, atol=1e-9)
    # float32 too, on a 1-channel 8×8 model (the training configuration)
    model32 = _tiny_flow(conv, coupling, dtype=torch.float32)
    x32 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(model32.decode(model32.encode(x32)), x32, rtol=0, atol=1e-4)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("conv", CONVS)
def test_logdet_matches_autograd_jacobian(conv, coupling):
    model = _tiny_flow(conv, coupling, size=(4, 4), perturb=0.1)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, logdet, _ = model.transform(x)
    assert logdet.shape == (2,)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flatten_latents(model.encode(v)), x[b:b + 1])
        jac = jac.reshape(16, 16)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        err = float((logabsdet - logdet[b]).detach())
        assert abs(err) < 1e-8, f"{conv}/{coupling}: slogdet and logdet differ by {err:.3e}"


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_reverse_permutation_is_invertible_with_exact_logdet(coupling):
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 2, 8, coupling=coupling, image_size=4, permutation="reverse").double()
    g = torch.Generator().manual_seed(1)
    model.train()(torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64))
    _perturb(model, 0.1, g)
    model.eval()
    assert all(step.permute is not None for level in model.levels for step in level.steps)
    x = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(model.decode(model.encode(x)), x, rtol=0, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda v: flatten_latents(model.encode(v)), x).reshape(16, 16)
    assert abs(float(torch.linalg.slogdet(jac).logabsdet - model.transform(x)[1][0].detach())) < 1e-8
    with pytest.raises(ValueError, match="permutation must be one of"):
        CInCFlow(1, 1, 1, 4, permutation="rotate")


def test_bits_per_dim_on_a_gaussian_with_known_answer():
    # With no flow steps every prior starts as a standard normal on the centred image (x - 0.5).
    for levels in (1, 2):
        model = CInCFlow(1, levels, 0, 4, image_size=4).double()
        x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(levels), dtype=torch.float64)
        expected = (-0.5 * (math.log(2 * math.pi) + (x - 0.5) ** 2)).flatten(1).sum(1)
        assert torch.allclose(model.log_prob(x), expected, atol=1e-12)
    # All pixels at 0.5: log p = -D/2·log 2π, so bpd = n_bits + log2(2π)/2 exactly.
    model = CInCFlow(1, 1, 0, 4).double()
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    with torch.no_grad():
        bpd8, bpd17 = float(model.bits_per_dim(x, n_bits=8)), float(model.bits_per_dim(x, n_bits=math.log2(17)))
    assert math.isclose(bpd8, 8 + 0.5 * math.log2(2 * math.pi), rel_tol=1e-12)
    assert math.isclose(bpd17,
                        math.log2(17) + 0.5 * math.log2(2 * math.pi), rel_tol=1e-12)


@pytest.mark.parametrize("conv", CONVS)
def test_sampling_works_for_every_conv(conv):
    model = _tiny_flow(conv, "quad", dtype=torch.float32)
    images = model.sample(3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    # At temperature 0 every latent is its prior's mean: the result does not depend on the noise.
    a = model.sample(2, 0.0, generator=torch.Generator().manual_seed(1))
    b = model.sample(2, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, atol=1e-6)


def test_latent_api_round_trip_and_errors():
    model = _tiny_flow()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    shapes = model.latent_shapes()
    flat = flatten_latents(model.encode(x))
    assert flat.shape == (2, 64)
    assert torch.allclose(model.decode(unflatten_latents(flat, shapes)), x, atol=1e-9)
    # Only the last latent given: the split-off one is drawn from its conditional prior.
    partial = model.decode([None, model.encode(x)[-1]], temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert partial.shape == x.shape
    with pytest.raises(ValueError, match="flat must be"):
        unflatten_latents(flat[:, :-1], shapes)
    with pytest.raises(ValueError, match="one per level"):
        model.decode([flat])
    with pytest.raises(ValueError, match="multiples of 2\\*\\*levels"):
        model.log_prob(torch.rand(1, 1, 6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="channels"):
        model.log_prob(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    # Extra constructor arguments reach every convolution (here a 2×2 CInC kernel).
    k2 = CInCFlow(1, 2, 1, 4, image_size=8, conv_kwargs={"kernel_size": 2}).double()
    assert all(step.conv.kernel_size == 2 for level in k2.levels for step in level.steps)
    assert torch.allclose(k2.decode(k2.encode(x)), x, atol=1e-9)
    with pytest.raises(ValueError, match="conv must be one of"):
        CInCFlow(1, 1, 1, 4, conv="nope")
    with pytest.raises(ValueError, match="coupling must be one of"):
        CInCFlow(1, 1, 1, 4, coupling="nope")


# ------------------------------------------------------------------------------------------------------------
# data


def test_digits_data_is_fixed_and_bundled():
    data = load_data("digits")
    assert (len(data.train), len(data.test), data.num_levels, data.shape) == (1500, 297, 17, (1, 8, 8))
    assert data.train.images.dtype == torch.uint8 and int(data.train.images.max()) == 16
    again = load_data("digits")
    assert torch.equal(data.test.images, again.test.images)  # the split never changes


@pytest.mark.parametrize("name, expected", [("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                            ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
                                            ("cifar10", "cifar-10-batches-py/data_batch_1")])
def test_missing_data_names_the_expected_files(tmp_path, name, expected):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match=expected):
        load_data(name, str(tmp_path))


def _write_idx(path, array):
    """An IDX file (MNIST's format): magic 0x0000 08 nd (unsigned bytes), big-endian int32 sizes, the bytes."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_loading_from_local_idx_files(tmp_path, name, folder):
    pytest.importorskip("torchvision")
    import numpy as np

    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    train_images = rng.integers(0, 256, (12, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 12))
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5))
    data = load_data(name, str(tmp_path))
    assert (len(data.train), len(data.test), data.num_levels, data.shape) == (12, 5, 256, (1, 32, 32))
    image = data.train.images[3, 0]
    assert torch.equal(image[2:30, 2:30], torch.from_numpy(train_images[3]).to(torch.uint8))
    assert int(image[:2].abs().sum()) == 0  # zero padding to 32×32
    five = load_data(name, str(tmp_path), n_bits=5)
    assert five.num_levels == 32 and torch.equal(five.train.images, data.train.images >> 3)


def test_cifar10_files_that_torchvision_refuses_are_explained(tmp_path):
    pytest.importorskip("torchvision")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
              "batches.meta"):
        (folder / f).write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="torchvision refused them"):
        load_data("cifar10", str(tmp_path))


def test_data_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="data must be one of"):
        load_data("svhn", str(tmp_path))
    with pytest.raises(ValueError, match="needs a data root"):
        load_data("cifar10")
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_data("imagefolder", str(tmp_path / "absent"), image_size=8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images under"):
        load_data("imagefolder", str(tmp_path / "empty"), image_size=8)


def test_image_folder_loads_and_splits(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            pixels = torch.randint(0, 256, (12, 10, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    data = load_data("imagefolder", str(tmp_path), image_size=8, n_bits=5)
    assert (len(data.train), len(data.test), data.num_levels, data.shape) == (18, 2, 32, (3, 8, 8))
    image, label = data.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and int(image.max()) < 32
    assert data.classes == ["a", "b"] and label in (0, 1)


# ------------------------------------------------------------------------------------------------------------
# training, checkpoints, command line


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(name=name, out_dir=str(tmp_path / name), preset="digits-tiny", steps=4, batch_size=32, warmup=2,
                eval_every=1000, sample_every=1000, checkpoint_every=1000, n_samples=4, temperatures=(0.7,))
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_lowers_test_bpd(tmp_path):
    cfg = _cfg(tmp_path, steps=60, batch_size=64, lr=5e-3, warmup=5, eval_every=5)
    result = train(cfg, progress=False)
    first, last = result["history"]["test_bpd"][0], result["history"]["test_bpd"][-1]
    assert last < first - 0.3, f"test bits/dim {first:.3f} -> {last:.3f}"
    out = tmp_path / "run"
    for f in ("checkpoint.pt", "config.json", "metrics.json", "loss.png", "samples/step_000060_T0.70.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["steps"] == 60
    model, ckpt = load_model(str(out / "checkpoint.pt"))
    data = load_data("digits")
    assert math.isclose(evaluate(model, data.test, 17), last, rel_tol=1e-5)
    assert ckpt["step"] == 60


def test_resume_gives_the_same_next_losses(tmp_path):
    # 256 images a step: 5 steps an epoch, so the resumed stretch crosses an epoch boundary.
    straight = train(_cfg(tmp_path, "straight", steps=7, batch_size=256), progress=False)
    first = train(_cfg(tmp_path, "resumed", steps=3, batch_size=256), progress=False)
    assert first["step"] == 3
    resumed = train(_cfg(tmp_path, "resumed", steps=7, batch_size=256), resume=True, progress=False)
    assert resumed["history"]["train_bpd"] == straight["history"]["train_bpd"]
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="cannot resume"):
        train(_cfg(tmp_path, "resumed", steps=9, batch_size=256, hidden_channels=4), resume=True, progress=False)


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"format": "cinc_kernels.flow/1", "value": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": "cinc_kernels.flow/1", "value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["value"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    good = tmp_path / "good.pt"
    model = CInCFlow(1, 1, 1, 4, image_size=4)
    torch.save({"format": "cinc_kernels.flow/1", "model_config": model.config, "model": model.state_dict(),
                "step": 0}, good)
    assert load_model(str(good))[1]["step"] == 0
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        load_checkpoint(str(garbage))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(RuntimeError, match="not a cinc_kernels.flow checkpoint"):
        load_checkpoint(str(foreign))
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"format": "cinc_kernels.flow/1", "model_config": dict(model.config, hidden_channels=5),
                "model": model.state_dict(), "step": 0}, mismatched)
    with pytest.raises(RuntimeError, match="does not match"):
        load_model(str(mismatched))


def test_command_line_train_sample_eval(tmp_path, capsys):
    from cinc_kernels.flow.__main__ import main

    out = tmp_path / "cli"
    assert main(["train", "--preset", "digits-tiny", "--steps", "3", "--out-dir", str(out), "--no-progress",
                 "--n-samples", "4", "--temperatures", "0.5", "1.0"]) == 0
    assert (out / "samples" / "step_000003_T1.00.png").is_file()
    ckpt = str(out / "checkpoint.pt")
    assert main(["sample", "--checkpoint", ckpt, "--n", "4", "--temperatures", "0.5", "0.9"]) == 0
    assert (out / "samples" / "sample_T0.90.png").is_file()
    assert (out / "samples" / "sample_temperatures.png").is_file()
    times = json.loads((out / "samples" / "sample_times.json").read_text())
    assert set(times["seconds"]) == {"0.50", "0.90"}
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["test_images"] == 297 and math.isfinite(report["test_bits_per_dim"])
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# DDP: two CPU processes on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_batch():
    g = torch.Generator().manual_seed(11)
    return torch.rand(8, 1, 8, 8, generator=g)


def _ddp_model():
    torch.manual_seed(3)
    model = CInCFlow(1, 2, 1, 8, image_size=8)
    model.train()(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(4)))  # ActNorm init
    _perturb(model, 0.05, torch.Generator().manual_seed(5))
    return model


def _bpd_loss(net, x):
    return CInCFlow.bits_per_dim_from_log_prob(net(x), x[0].numel(), math.log2(17)).mean()


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _ddp_model()
        net = torch.nn.parallel.DistributedDataParallel(model)
        x = _ddp_batch().chunk(world)[rank]
        _bpd_loss(net, x).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        data = load_data("digits")
        test = LevelDataset(data.test.images[:50], data.test.labels[:50])
        bpd = evaluate(model, test, 17, batch_size=7)
        small = ImageData("digits", LevelDataset(data.train.images[:256], data.train.labels[:256]), test, 17,
                          (1, 8, 8))
        result = train(_cfg(out_dir, "ddp", steps=3, batch_size=32), progress=False, data=small)
        params = torch.cat([p.detach().flatten() for p in result["model"].parameters()])
        torch.save({"grads": grads, "eval_bpd": bpd, "params": params, "history": result["history"]},
                   os.path.join(str(out_dir), f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_and_metrics_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    model = _ddp_model()
    _bpd_loss(model, _ddp_batch()).backward()
    for name, p in model.named_parameters():
        for r in range(2):
            assert torch.allclose(ranks[r]["grads"][name], p.grad, rtol=1e-4, atol=1e-6), f"rank {r}: {name}"
    data = load_data("digits")
    single = evaluate(model, LevelDataset(data.test.images[:50], data.test.labels[:50]), 17, batch_size=16)
    assert math.isclose(ranks[0]["eval_bpd"], single, rel_tol=1e-6)
    assert ranks[1]["eval_bpd"] == ranks[0]["eval_bpd"]
    # The short DDP run: ranks stay in sync, metrics are the same everywhere, only rank 0 wrote files.
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["history"]["train_bpd"] == ranks[1]["history"]["train_bpd"]
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()
    assert load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))["rng"]["world_size"] == 2
