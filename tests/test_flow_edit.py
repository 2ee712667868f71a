"""Latent attribute editing: directions against independent computations, α = 0 gives the input back,
and the ``edit`` command on the digits and on an image folder with a CSV of attributes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cinc_kernels.flow import CInCFlow, flatten_latents
from cinc_kernels.flow.edit import attribute_directions, edit_images, read_attribute_csv
from cinc_kernels.flow.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_correlation_direction_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    n, d = 500, 6
    attrs = np.stack([rng.choice([-1.0, 1.0], n), rng.normal(size=n)], axis=1)  # binary and continuous
    mixing = rng.normal(size=(2, d))
    z = attrs @ mixing + rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d)
    got = attribute_directions(torch.from_numpy(z), torch.from_numpy(attrs), "correlation")
    assert got.shape == (2, d) and got.dtype == torch.float64
    sigma = z.std(0)
    for k in range(2):
        c = np.array([np.corrcoef(attrs[:, k], z[:, j])[0, 1] for j in range(d)])
        expected = sigma * c / np.linalg.norm(c)
        np.testing.assert_allclose(got[k].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_correlation_direction_exact_on_a_constructed_case():
    # z0 is the attribute itself, z1 and z2 are centred and exactly uncorrelated with it: the direction is the
    # first axis, scaled by z0's standard deviation.
    a = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    z = torch.stack([3 * a + 2, torch.tensor([1.0, 1, -1, -1, 0, 0]), torch.tensor([5.0, 5, 0, 0, -5, -5])], 1)
    v = attribute_directions(z, a, "correlation")
    assert torch.allclose(v, torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-7)


def test_mean_difference_direction():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 4.0], [12.0, 8.0]])
    labels = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    v = attribute_directions(z, labels, "mean-difference")
    assert torch.allclose(v, torch.tensor([[9.0, 5.0]]))
    # ±1 coding gives the same split
    assert torch.allclose(attribute_directions(z, 2 * labels - 1, "mean-difference"), v)


def test_direction_errors():
    z = torch.randn(5, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        attribute_directions(z, torch.randn(5), "pca")
    with pytest.raises(ValueError, match="attributes must be"):
        attribute_directions(z, torch.randn(4, 2))
    with pytest.raises(ValueError, match="single value"):
        attribute_directions(z, torch.ones(5, 1))
    with pytest.raises(ValueError, match="single value"):
        attribute_directions(z, torch.ones(5, 1), "mean-difference")


def test_alpha_zero_returns_the_input_and_moves_are_linear_in_latent_space():
    torch.manual_seed(0)
    model = CInCFlow(1, 2, 1, 8, image_size=8).double()
    g = torch.Generator().manual_seed(1)
    model.train()(torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    direction = torch.randn(64, generator=g, dtype=torch.float64)
    alphas = [-1.0, 0.0, 0.5]
    strips = edit_images(model, x, direction, alphas)
    assert strips.shape == (3, 3, 1, 8, 8)
    assert torch.allclose(strips[:, 1], x, rtol=0, atol=1e-10)
    assert not torch.allclose(strips[:, 2], x, atol=1e-3)
    with torch.no_grad():
        moved = flatten_latents(model.encode(strips[:, 2]))
        start = flatten_latents(model.encode(x))
    assert torch.allclose(moved, start + 0.5 * direction, atol=1e-8)
    with pytest.raises(ValueError, match="direction must have shape"):
        edit_images(model, x, direction[:-1], alphas)


def test_read_attribute_csv(tmp_path):
    path = tmp_path / "attrs.csv"
    path.write_text("image_id,Smiling,Young\nimg/a.png,1,-1\nb.png,-1,1\n")
    names, table = read_attribute_csv(str(path))
    assert names == ["Smiling", "Young"] and table == {"a.png": [1.0, -1.0], "b.png": [-1.0, 1.0]}
    path.write_text("image_id,Smiling\na.png,yes\n")
    with pytest.raises(ValueError, match="line 2: attribute values must be numbers"):
        read_attribute_csv(str(path))
    path.write_text("image_id,Smiling\na.png,1,2\n")
    with pytest.raises(ValueError, match="line 2: 3 fields"):
        read_attribute_csv(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_attribute_csv(str(tmp_path / "absent.csv"))


def _train_tiny(out, **kw):
    cfg = dict(name="edit", out_dir=str(out), preset="digits-tiny", steps=2, batch_size=16, warmup=1,
               n_samples=4, temperatures=(0.7,))
    cfg.update(kw)
    train(TrainConfig(**cfg), progress=False)
    return str(out / "checkpoint.pt")


def test_edit_command_on_digits(tmp_path, capsys):
    from cinc_kernels.flow.__main__ import main

    ckpt = _train_tiny(tmp_path / "run")
    out = tmp_path / "edits"
    assert main(["edit", "--checkpoint", ckpt, "--attribute", "3", "8", "--alphas", "-1", "0", "1",
                 "--images", "0", "5", "--n-fit", "400", "--out", str(out)]) == 0
    assert (out / "edit_correlation_3.png").is_file() and (out / "edit_correlation_8.png").is_file()
    saved = torch.load(out / "directions_correlation.pt", weights_only=True)
    assert saved["names"] == [str(i) for i in range(10)] and saved["directions"].shape == (10, 64)
    assert main(["edit", "--checkpoint", ckpt, "--method", "mean-difference", "--attribute", "1",
                 "--n-fit", "400", "--out", str(out)]) == 0
    assert (out / "edit_mean-difference_1.png").is_file()
    capsys.readouterr()
    assert main(["edit", "--checkpoint", ckpt, "--attribute", "cat", "--n-fit", "100", "--out", str(out)]) == 2
    assert "unknown attribute" in capsys.readouterr().err


def test_edit_command_on_an_image_folder_with_attribute_csv(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    from cinc_kernels.flow.__main__ import main

    root = tmp_path / "faces"
    (root / "all").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows = ["image_id,Bright"]
    for i in range(24):
        bright = i % 2
        pixels = torch.randint(0, 128, (8, 8, 3), generator=g, dtype=torch.uint8) + 127 * bright
        Image.fromarray(pixels.numpy()).save(root / "all" / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{2 * bright - 1}")
    (tmp_path / "attrs.csv").write_text("\n".join(rows) + "\n")
    ckpt = _train_tiny(tmp_path / "run", data="imagefolder", data_root=str(root), image_size=8, n_bits=5,
                       batch_size=8)
    out = tmp_path / "edits"
    assert main(["edit", "--checkpoint", ckpt, "--attributes", str(tmp_path / "attrs.csv"), "--images", "0", "1",
                 "--out", str(out)]) == 0
    assert (out / "edit_correlation_Bright.png").is_file()
