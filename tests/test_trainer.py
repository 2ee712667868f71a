"""Trainer features around the flow (docs/spec.md §4): TensorBoard logging, sample grids, horizontal flips,
downsampled-ImageNet ``.npz`` batches, skipped unreadable images, and ``eval --reconstruction``."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from cinc_kernels.flow.__main__ import main
from cinc_kernels.flow.data import load_data, random_horizontal_flip
from cinc_kernels.flow.train import TrainConfig, save_grid, train

from .cases import TINY_TRAIN_ARGS as TINY



# Tiny problems: extra OpenMP threads only spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorboard_logs_the_scalars_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(TrainConfig(preset="digits-tiny", steps=3, eval_every=2, sample_every=3, n_samples=4, temperatures=(0.7,),
                      out_dir=str(out), tensorboard=True), progress=False)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/bits_per_dim", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    assert [e.step for e in events.Scalars("test/bits_per_dim")] == [2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e.value for e in events.Scalars("train/bits_per_dim")] == pytest.approx(metrics["train_bpd"])
    assert "samples/T0.70" in tags["images"]
    # The JSON/PNG outputs stay the default and are still written.
    assert (out / "loss.png").is_file() and (out / "samples" / "step_000003_T0.70.png").is_file()


def test_no_tensorboard_folder_without_the_flag(tmp_path):
    train(TrainConfig(preset="digits-tiny", steps=1, n_samples=2, temperatures=(1.0,), out_dir=str(tmp_path / "r")),
          progress=False)
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_save_grid_lays_out_images_with_white_padding(tmp_path):
    from PIL import Image

    images = torch.stack([torch.full((1, 2, 3), 0.0), torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 0.5)])
    path = tmp_path / "grid.png"
    save_grid(images, str(path), nrow=2, padding=1, scale=2)
    grid = np.asarray(Image.open(path).convert("L"))
    # 2 columns × (3·2 + 2 padding) + 2, 2 rows × (2·2 + 2) + 2: pixels scaled 2×, padding too.
    assert grid.shape == (2 * (4 + 2) + 2, 2 * (6 + 2) + 2)
    assert grid[2, 2] == 0 and grid[2 + 3, 2 + 5] == 0  # first image, both corners
    assert grid[2, 2 + 8] == 255  # second image
    assert grid[2 + 6, 2] == 128  # third image, second row
    assert grid[0, 0] == 255 and grid[1, 5] == 255  # padding
    assert not [f for f in os.listdir(tmp_path) if f != "grid.png"]


def test_random_horizontal_flip_is_seeded_and_flips_whole_images():
    images = torch.arange(64 * 3 * 2 * 5, dtype=torch.uint8).reshape(64, 3, 2, 5)
    a = random_horizontal_flip(images, torch.Generator().manual_seed(1))
    b = random_horizontal_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [bool(torch.equal(a[i], images[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(a[i], images[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54  # both happen, about half each
    assert random_horizontal_flip(images[:0], torch.Generator()).shape == (0, 3, 2, 5)


def test_flip_training_resumes_exactly(tmp_path):
    cfg = dict(preset="digits-tiny", batch_size=16, n_samples=2, temperatures=(1.0,), flip=True)
    straight = train(TrainConfig(steps=6, out_dir=str(tmp_path / "a"), **cfg), progress=False)
    train(TrainConfig(steps=3, out_dir=str(tmp_path / "b"), **cfg), progress=False)
    resumed = train(TrainConfig(steps=6, out_dir=str(tmp_path / "b"), **cfg), resume=True, progress=False)
    assert resumed["history"]["train_bpd"] == straight["history"]["train_bpd"]
    no_flip = train(TrainConfig(steps=6, out_dir=str(tmp_path / "c"), **dict(cfg, flip=False)), progress=False)
    assert no_flip["history"]["train_bpd"] != straight["history"]["train_bpd"]


def _write_imagenet_batch(path, images: np.ndarray, labels: np.ndarray, with_mean: bool) -> None:
    """The archives' layout: ``data`` (N, 3·S·S) uint8, channel-planar; ``labels`` 1…1000 (train batches also hold
    a ``mean``)."""
    n = images.shape[0]
    extra = {"mean": images.reshape(n, -1).mean(0)} if with_mean else {}
    np.savez(path, data=images.reshape(n, -1), labels=labels.tolist(), **extra)


@pytest.mark.parametrize("side", [32, 64])
def test_downsampled_imagenet_npz_batches(tmp_path, side):
    rng = np.random.default_rng(side)
    name = f"imagenet{side}"
    train_dir, val_dir = tmp_path / f"Imagenet{side}_train", tmp_path / f"Imagenet{side}_val"
    train_dir.mkdir()
    val_dir.mkdir()
    parts = [rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8) for n in (5, 3)]
    labels = [rng.integers(1, 1001, n) for n in (5, 3)]
    for i, (im, lb) in enumerate(zip(parts, labels), start=1):
        _write_imagenet_batch(train_dir / f"train_data_batch_{i}.npz", im, lb, with_mean=True)
    val = rng.integers(0, 256, (2, 3, side, side), dtype=np.uint8)
    _write_imagenet_batch(val_dir / "val_data.npz", val, np.array([1, 1000]), with_mean=False)

    data = load_data(name, str(tmp_path))
    assert (data.name, data.shape, data.num_levels) == (name, (3, side, side), 256)
    assert (len(data.train), len(data.test)) == (8, 2)
    image, label = data.train[6]  # the second file's second image
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(parts[1][1]))
    assert label == labels[1][1] - 1
    assert torch.equal(data.test[1][0], torch.from_numpy(val[1])) and data.test[1][1] == 999
    # Channel-planar: the first S·S bytes of a row are the red plane.
    flat = parts[0][0].reshape(-1)
    assert torch.equal(data.train[0][0][0].reshape(-1), torch.from_numpy(flat[: side * side]))
    five = load_data(name, str(tmp_path), n_bits=5)
    assert five.num_levels == 32 and torch.equal(five.train[0][0], data.train[0][0] >> 3)
    other = "imagenet64" if side == 32 else "imagenet32"
    with pytest.raises(ValueError, match="other resolution"):
        load_data(other, str(tmp_path))


def test_downsampled_imagenet_missing_or_damaged_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_<n>.npz"):
        load_data("imagenet32", str(tmp_path))
    (tmp_path / "train_data_batch_1.npz").write_bytes(b"not a zip")
    _write_imagenet_batch(tmp_path / "val_data.npz", np.zeros((1, 3, 32, 32), np.uint8), np.array([1]), False)
    with pytest.raises(RuntimeError, match="train_data_batch_1.npz cannot be read"):
        load_data("imagenet32", str(tmp_path))


def test_imagefolder_skips_unreadable_files_naming_them(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    good = tmp_path / "b" / "0.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable image file\(s\).*broken\.png.*truncated\.png"):
        data = load_data("imagefolder", str(tmp_path), image_size=4)
    assert len(data.train) + len(data.test) == 12
    for ds in (data.train, data.test):  # every remaining file loads
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 4, 4)


def test_eval_reconstruction_prints_the_round_trip_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--reconstruction", "--batch-size", "100"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = report["reconstruction"]
    assert rec["images"] == report["test_images"] == 297 and rec["non_finite"] == 0
    assert 0 < rec["mean_abs_error"] <= rec["max_abs_error"] < 1e-4  # float32, tiny model: a few ulps
    assert math.isfinite(report["test_bits_per_dim"])
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert "reconstruction" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
