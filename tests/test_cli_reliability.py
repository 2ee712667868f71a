"""The flow command line's quieter corners never give a silently wrong result: ``eval``/``edit`` run a model at the
bits per pixel it was trained at, 16-bit and damaged image files are handled at start-up and named, ``sample --n``
streams its grid with bounded memory, every option of ``edit`` and every ``--conv-kwargs`` value is checked, and a
run refused at start-up writes nothing.

Models are ``digits-tiny`` (or the same preset on a few generated 8×8 images) trained for a handful of steps.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from cinc_kernels.flow.__main__ import main
from cinc_kernels.flow.config import TrainConfig, check_config
from cinc_kernels.flow.data import load_data

from .cases import TINY_TRAIN_ARGS as TINY
from .cases import assert_one_error_line, folder_snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "digits"
    assert main(["train", *TINY, "--steps", "3", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def five_bit_run(tmp_path_factory):
    """A model trained on 5-bit data: 24 random 8×8 RGB PNGs in two classes."""
    pytest.importorskip("torchvision")
    from PIL import Image

    base = tmp_path_factory.mktemp("five_bit")
    root = base / "images"
    rng = np.random.default_rng(1)
    for i in range(24):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i:02d}.png")
    out = base / "run"
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "8", "--data", "imagefolder", "--data-root",
                 str(root), "--image-size", "8", "--n-bits", "5", "--out-dir", str(out)]) == 0
    return out, root


# ------------------------------------------------------------------------------------------------------------
# eval and edit run the model at its own bits per pixel


def test_eval_uses_the_models_n_bits_with_or_without_data(five_bit_run, capsys):
    out, root = five_bit_run
    ckpt = str(out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt]) == 0
    default = _last_json(capsys.readouterr().out)["test_bits_per_dim"]
    assert main(["eval", "--checkpoint", ckpt, "--data", "imagefolder", "--data-root", str(root)]) == 0
    with_data = _last_json(capsys.readouterr().out)["test_bits_per_dim"]
    assert main(["eval", "--checkpoint", ckpt, "--n-bits", "5"]) == 0
    explicit = _last_json(capsys.readouterr().out)["test_bits_per_dim"]
    # The same number as training reported (same images, same fixed noise), at the 5-bit scale: uniform 5-bit
    # noise costs 5 bits/dim, the same images read at 8 bits would cost 3 more.
    history = json.loads((out / "metrics.json").read_text())
    assert default == with_data == explicit == pytest.approx(history["test_bpd"][-1], abs=1e-9)
    assert 4.5 < default < 7.0


@pytest.mark.parametrize("extra", [[], ["--data", "imagefolder"]])
def test_eval_and_edit_refuse_n_bits_that_contradict_the_model(five_bit_run, capsys, extra, tmp_path):
    out, root = five_bit_run
    data = [*extra, "--data-root", str(root)] if extra else []
    for command in ("eval", "edit"):
        argv = [command, "--checkpoint", str(out / "checkpoint.pt"), *data, "--n-bits", "8"]
        if command == "edit":
            argv += ["--out", str(tmp_path / "edits")]
        assert main(argv) == 2
        assert_one_error_line(capsys.readouterr().err, "--n-bits 8", "32 levels")
    assert not (tmp_path / "edits").exists()


def test_eval_refuses_data_whose_levels_differ_from_the_models(digits_run, capsys):
    assert main(["eval", "--checkpoint", str(digits_run / "checkpoint.pt"), "--n-bits", "5"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--n-bits 5", "17 levels")
    assert main(["eval", "--checkpoint", str(digits_run / "checkpoint.pt"), "--data", "photos", "--image-size",
                 "8"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--data photos", "256 levels", "17")


def test_edit_with_data_given_edits_at_the_models_n_bits(five_bit_run, tmp_path):
    out, root = five_bit_run
    ckpt = str(out / "checkpoint.pt")
    common = ["--images", "0", "1", "--n-fit", "20"]
    assert main(["edit", "--checkpoint", ckpt, *common, "--out", str(tmp_path / "own")]) == 0
    assert main(["edit", "--checkpoint", ckpt, "--data", "imagefolder", "--data-root", str(root), *common,
                 "--out", str(tmp_path / "given")]) == 0
    own = torch.load(tmp_path / "own" / "directions_correlation.pt", weights_only=True)["directions"]
    given = torch.load(tmp_path / "given" / "directions_correlation.pt", weights_only=True)["directions"]
    assert torch.equal(own, given)
    assert folder_snapshot(tmp_path / "own", (".lock",)) == folder_snapshot(tmp_path / "given", (".lock",))


# ------------------------------------------------------------------------------------------------------------
# image files: 16 bits, damaged streams


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        chunks.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(data)) + kind + data
                                           + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks)


def _rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``pixels`` ``(H, W, 3)`` uint16, written by hand (PIL cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return _png_from_chunks([(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)),
                             (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


def test_16_bit_pngs_keep_their_top_8_bits(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    rng = np.random.default_rng(2)
    expected = {}
    for i in range(12):
        folder = tmp_path / "ab"[i % 2]
        folder.mkdir(exist_ok=True)
        if i % 3 == 2:
            pixels = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
            (folder / f"{i}.png").write_bytes(_rgb16_png(pixels))
            expected[f"{i}.png"] = (pixels >> 8).astype(np.uint8).transpose(2, 0, 1)
        else:
            pixels = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
            # I;16 (little-endian) and I;16B (big-endian) both write a 16-bit grey PNG
            image = Image.fromarray(pixels if i % 3 == 0 else pixels.astype(">u2"))
            assert image.mode == ("I;16" if i % 3 == 0 else "I;16B")
            image.save(folder / f"{i}.png")
            expected[f"{i}.png"] = np.broadcast_to((pixels >> 8).astype(np.uint8), (3, 8, 8))
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")  # PIL reads it as 16-bit grey
    data = load_data("imagefolder", str(tmp_path), image_size=8)
    seen = 0
    for ds in (data.train, data.test):
        for i in range(len(ds)):
            image, _ = ds[i]
            np.testing.assert_array_equal(image.numpy(), expected[os.path.basename(ds.path(i))])
            seen += 1
    assert seen == 12
    data5 = load_data("imagefolder", str(tmp_path), image_size=8, n_bits=5)
    image, _ = data5.train[0]
    np.testing.assert_array_equal(image.numpy(), expected[os.path.basename(data5.train.path(0))] >> 3)


def test_integer_and_float_images_of_no_fixed_range_are_skipped_naming_them(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    rng = np.random.default_rng(3)
    (tmp_path / "a").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.png")
    Image.fromarray(rng.integers(0, 2**20, (8, 8)).astype(np.int32)).save(tmp_path / "a" / "wide.tiff")
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / "a" / "float.tiff")
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable.*(wide|float)\.tiff.*mode.*(wide|float)\.tiff"):
        data = load_data("imagefolder", str(tmp_path), image_size=8)
    assert len(data.train) + len(data.test) == 4


def _corrupt_png(tmp_path) -> bytes:
    """A PNG whose chunk checksums are all valid but whose deflate stream is broken."""
    from PIL import Image

    y, x = np.mgrid[0:16, 0:16]
    pixels = np.stack([x * 16, y * 16, (x + y) * 8], -1).astype(np.uint8)  # smooth: Huffman-coded, not stored
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png")
    chunks = []
    for kind, data in _png_chunks(buffer.getvalue()):
        if kind == b"IDAT":
            middle = len(data) // 2
            data = data[:middle] + b"\xff" * 8 + data[middle + 8:]
        chunks.append((kind, data))
    return _png_from_chunks(chunks)


def test_a_png_with_a_broken_deflate_stream_is_skipped_at_start_up_naming_it(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    broken = _corrupt_png(tmp_path)
    with Image.open(io.BytesIO(broken)) as image:
        image.verify()  # the checksums hold: the structural check alone lets it through
    with pytest.raises(OSError), Image.open(io.BytesIO(broken)) as image:
        image.load()
    rng = np.random.default_rng(4)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(broken)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image file\(s\).*broken\.png"):
        data = load_data("imagefolder", str(tmp_path), image_size=8)
    assert len(data.train) + len(data.test) == 10
    for ds in (data.train, data.test):  # what is left decodes, so no training step meets the broken file
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 8, 8)


# ------------------------------------------------------------------------------------------------------------
# sample --n: streamed, bounded


def test_sample_streams_chunks_into_the_same_grid_torchvision_draws(digits_run, tmp_path, monkeypatch):
    from PIL import Image
    from torchvision.utils import save_image

    from cinc_kernels.flow import plots
    from cinc_kernels.flow.checkpoint import load_model
    from cinc_kernels.flow.model import CInCFlow

    ckpt = str(digits_run / "checkpoint.pt")
    model, _ = load_model(ckpt)
    generator = torch.Generator().manual_seed(5)
    reference = torch.cat([model.sample(k, 0.7, generator=generator) for k in (7, 7, 7, 7, 2)])

    calls = []
    real_sample = CInCFlow.sample

    def counting_sample(self, n, *args, **kwargs):
        calls.append(n)
        return real_sample(self, n, *args, **kwargs)

    monkeypatch.setattr(plots, "SAMPLE_CHUNK", 7)
    monkeypatch.setattr(CInCFlow, "sample", counting_sample)
    assert main(["sample", "--checkpoint", ckpt, "--n", "30", "--temperatures", "0.7", "--seed", "5",
                 "--out", str(tmp_path)]) == 0
    assert calls == [7, 7, 7, 7, 2]
    written = np.asarray(Image.open(tmp_path / "sample_T0.70.png").convert("RGB"))
    buffer = io.BytesIO()
    save_image(plots.grid_tensor(reference, None, 1, 8), buffer, format="png", padding=0)
    np.testing.assert_array_equal(written, np.asarray(Image.open(buffer).convert("RGB")))
    assert written.shape == (5 * 72 + 8, 6 * 72 + 8, 3)  # 30 images: 6 columns, 5 rows, the last one short


def test_sample_memory_does_not_grow_with_n(digits_run, tmp_path):
    pytest.importorskip("resource")
    script = (
        "import resource, sys, torch\n"
        "from cinc_kernels.flow.__main__ import main\n"
        "ckpt, out = sys.argv[1:]\n"
        "peaks = []\n"
        "for n in (64, 4000):\n"
        "    assert main(['sample', '--checkpoint', ckpt, '--n', str(n), '--temperatures', '1.0', '--out', "
        "f'{out}/{n}']) == 0\n"
        "    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "print(peaks[1] - peaks[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, str(digits_run / "checkpoint.pt"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    grown_kib = int(done.stdout.strip().splitlines()[-1])
    # Holding 4000 upscaled images at once (the grid as one float tensor) takes over 400 MiB more than 64 do.
    assert grown_kib < 64 * 1024, grown_kib
    assert (tmp_path / "4000" / "sample_T1.00.png").is_file()


def test_sample_shrinks_the_pixels_or_refuses_a_grid_too_large_to_view(digits_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from cinc_kernels.flow import plots

    monkeypatch.setattr(plots, "MAX_GRID_PIXELS", 20_000)
    ckpt = str(digits_run / "checkpoint.pt")
    assert main(["sample", "--checkpoint", ckpt, "--n", "64", "--temperatures", "1.0", "--out",
                 str(tmp_path / "small")]) == 0
    assert "pixels drawn 1×1" in capsys.readouterr().err
    assert Image.open(tmp_path / "small" / "sample_T1.00.png").size == (8 * 9 + 1, 8 * 9 + 1)
    assert main(["sample", "--checkpoint", ckpt, "--n", "1000", "--out", str(tmp_path / "large")]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "--n 1000", "20,000 pixels")
    most = int(err.split("use --n ")[1].split()[0])
    assert plots.largest_scale(most, (8, 8), 1) == 1 and plots.largest_scale(most + 1, (8, 8), 1) is None
    assert not (tmp_path / "large").exists()


def test_train_refuses_n_samples_whose_grid_is_too_large_to_view(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--n-samples", "2000000", "--out-dir", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "n_samples 2000000", "pixels")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# options without range checks


@pytest.mark.parametrize("alphas", [["0", "nan"], ["inf"], ["--alphas=-inf"], ["1", "1e300"], ["--alphas=-1e300"],
                                    ["101"]])
def test_edit_alphas_out_of_range_are_refused(digits_run, tmp_path, capsys, alphas):
    # (argparse reads a value such as -inf after a space as an option; after = it is the option's value)
    argv = alphas if alphas[0].startswith("--") else ["--alphas", *alphas]
    assert main(["edit", "--checkpoint", str(digits_run / "checkpoint.pt"), *argv,
                 "--out", str(tmp_path / "edits")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--alphas")
    assert not (tmp_path / "edits").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--images", "-1"], "--images"),
    (["--n-fit", "1"], "--n-fit"),
    (["--seed", "-2"], "--seed"),
    (["--threads", "-1"], "--threads"),
    (["--n-bits", "0"], "--n-bits"),
    (["--image-size", "0"], "--image-size"),
    (["--data", "nope"], "--data"),
    (["--device", "tpu"], "--device"),
])
def test_edit_options_are_range_checked(digits_run, tmp_path, capsys, argv, needle):
    assert main(["edit", "--checkpoint", str(digits_run / "checkpoint.pt"), *argv,
                 "--out", str(tmp_path / "edits")]) == 2
    assert_one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "edits").exists()


def test_edit_refuses_alphas_that_make_the_images_non_finite(digits_run, tmp_path, capsys, monkeypatch):
    from cinc_kernels.flow import edit

    real = edit.edit_images

    def overflowing(model, x, direction, alphas):
        out = real(model, x, direction, alphas)
        out[:, list(alphas).index(2.0)] = float("inf")  # what a float32 latent far out decodes to
        return out

    monkeypatch.setattr(edit, "edit_images", overflowing)
    assert main(["edit", "--checkpoint", str(digits_run / "checkpoint.pt"), "--attribute", "3", "--n-fit", "100",
                 "--alphas", "0", "2", "--out", str(tmp_path / "edits")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--alphas 2", "'3'", "non-finite")
    assert not (tmp_path / "edits").exists()


@pytest.mark.parametrize("kwargs, error, needles", [
    ({"check_finite": "no"}, TypeError, ["check_finite", "true or false"]),
    ({"check_finite": 0}, TypeError, ["check_finite"]),
    ({"kernel_size": 2.5}, TypeError, ["kernel_size", "integer"]),
    ({"kernel_size": True}, TypeError, ["kernel_size", "integer"]),
    ({"init_scale": "0.01"}, TypeError, ["init_scale", "number"]),
    ({"init_scale": float("nan")}, ValueError, ["init_scale", "finite"]),
    ({"init_scale": float("inf")}, ValueError, ["init_scale", "finite"]),
    ({"max_contraction": float("-inf")}, ValueError, ["max_contraction", "finite"]),
    ({"max_log_diagonal": "none"}, TypeError, ["max_log_diagonal", "null"]),
])
def test_conv_kwargs_values_are_type_checked(kwargs, error, needles):
    with pytest.raises(error) as info:
        check_config(TrainConfig(conv_kwargs=kwargs))
    for needle in needles:
        assert needle in str(info.value)


def test_conv_kwargs_of_the_right_kinds_pass():
    check_config(TrainConfig(conv_kwargs={"check_finite": False, "kernel_size": 3, "init_scale": 1,
                                          "max_log_diagonal": None, "parametrization": "contractive"}))


@pytest.mark.parametrize("kwargs, needles", [
    ('{"check_finite": "no"}', ["check_finite", "true or false"]),
    ('{"init_scale": NaN}', ["init_scale", "finite"]),
    ('{"init_scale": Infinity}', ["init_scale", "finite"]),
    # finite but so large that the first forward pass overflows: refused at start-up, before any step
    ('{"init_scale": 1e30}', ["init_scale"]),
])
def test_bad_conv_kwargs_fail_at_start_up_writing_nothing(tmp_path, capsys, kwargs, needles):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out), "--conv-kwargs", kwargs]) == 2
    assert_one_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# a run refused at start-up writes nothing


def test_a_run_refused_at_start_up_writes_nothing_and_blocks_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "5000", "--out-dir", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "batch_size 5000", "1500 training images")
    assert not out.exists()
    out.mkdir()  # a folder the user made: kept, and still empty of run files
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "5000", "--out-dir", str(out)]) == 2
    capsys.readouterr()
    assert [f for f in os.listdir(out) if not f.startswith(".")] == []
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0  # not refused as "holds a run"
    assert (out / "config.json").is_file() and (out / "checkpoint.pt").is_file()


def test_overwrite_refused_at_start_up_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    before = folder_snapshot(out, (".lock",))
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "5000", "--out-dir", str(out), "--overwrite"]) == 2
    assert_one_error_line(capsys.readouterr().err, "batch_size 5000")
    assert folder_snapshot(out, (".lock",)) == before
