"""The flow command line protects every run: refusals leave an existing run byte-identical, one run per folder,
validated options with one ``error:`` line and exit code 2, checksummed checkpoints, exact resume, SIGINT saves,
SIGKILL loses at most the steps since the last checkpoint, atomic artefacts, a full disk named as such.

A few tests run ``python -m cinc_kernels.flow`` in a subprocess (what a user runs: exit code, stderr, signals); the
many option checks call ``main(argv)`` in-process, which is the same code without a new interpreter per case.
Models are ``digits-tiny`` trained for a handful of steps.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cinc_kernels.flow.__main__ import main
from cinc_kernels.flow.train import (
    RunLock,
    TrainConfig,
    atomic_write_bytes,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    train,
)

from .cases import TINY_TRAIN_ARGS as TINY
from .cases import assert_one_error_line, folder_snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny problems: extra OpenMP threads only spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args, cwd, env_extra=None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "cinc_kernels.flow", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step run; tests must leave it byte-identical."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--steps", "3", "--out-dir", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------------------
# the run folder


def test_existing_run_is_refused_by_the_command_and_left_byte_identical(run, tmp_path):
    before = folder_snapshot(run)
    proc = _cli("train", *TINY, "--steps", "5", "--out-dir", str(run), cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert_one_error_line(err, "already holds a run", "--resume", "--overwrite")
    assert folder_snapshot(run) == before


def test_a_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    lock = RunLock(str(folder))
    try:
        before = folder_snapshot(folder)
        proc = _cli("train", *TINY, "--steps", "2", "--out-dir", str(folder), cwd=tmp_path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2
        assert_one_error_line(err, "in use by another train process", f"pid {os.getpid()}")
        assert folder_snapshot(folder) == before
    finally:
        lock.release()
    # Released: the folder can be used (the lock of a finished or killed process never lingers).
    RunLock(str(folder)).release()


@pytest.mark.parametrize("change, needle", [
    (["--lr", "0.01"], "lr: 0.001 in the run, 0.01 now"),
    (["--optimizer", "adamax"], "optimizer"),
    (["--batch-size", "32"], "batch_size"),
    (["--seed", "3"], "seed"),
    (["--steps", "2"], "already at step 3"),
    (["--flip"], "flip"),
])
def test_resume_that_would_not_continue_exactly_is_refused_before_writing(run, capsys, change, needle):
    before = folder_snapshot(run)
    assert main(["train", *TINY, "--steps", "4", "--out-dir", str(run), "--resume", *change]) == 2
    assert_one_error_line(capsys.readouterr().err, "cannot resume", needle)
    assert folder_snapshot(run) == before


def test_resume_refuses_a_checkpoint_whose_settings_this_version_does_not_know(tmp_path, capsys):
    out = tmp_path / "future"
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    ckpt["config"]["warp_drive"] = True
    ckpt.pop("checksums")
    save_checkpoint(ckpt, str(out / "checkpoint.pt"))
    before = folder_snapshot(out)
    assert main(["train", *TINY, "--steps", "3", "--out-dir", str(out), "--resume"]) == 2
    assert_one_error_line(capsys.readouterr().err, "warp_drive")
    assert folder_snapshot(out) == before


def test_overwrite_replaces_the_old_run_and_its_stale_files(tmp_path):
    out = tmp_path / "again"
    assert main(["train", *TINY, "--steps", "3", "--sample-every", "3", "--out-dir", str(out)]) == 0
    assert (out / "samples" / "step_000003_T1.00.png").is_file()
    assert main(["train", *TINY, "--steps", "2", "--out-dir", str(out), "--overwrite"]) == 0
    assert not (out / "samples" / "step_000003_T1.00.png").exists()
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
    assert json.loads((out / "config.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("argv, needles", [
    (["train", "--grad-clip", "-1"], ["--grad-clip", "> 0"]),
    (["train", "--grad-clip", "nan"], ["--grad-clip"]),
    (["train", "--lr", "inf"], ["--lr", "finite"]),
    (["train", "--lr", "0"], ["--lr"]),
    (["train", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--steps", "2.5"], ["--steps", "integer"]),
    (["train", "--n-bits", "9"], ["--n-bits", "1…8"]),
    (["train", "--name", "../../x"], ["--name", "runs/"]),
    (["train", "--name", ""], ["--name"]),
    (["train", "--temperatures", "-1"], ["--temperatures"]),
    (["train", "--data", "nope"], ["--data", "invalid choice"]),
    (["train", "--conv", "nope"], ["--conv"]),
    (["train", "--conv-kwargs", "[1]"], ["--conv-kwargs", "JSON object"]),
    (["train", "--conv-kwargs", "{bad"], ["--conv-kwargs", "JSON"]),
    (["train", "--resume", "--overwrite"], ["--overwrite", "--resume"]),
    (["train", "--device", "tpu"], ["--device"]),
    (["eval", "--checkpoint", "absent.pt", "--batch-size", "-3"], ["--checkpoint"]),
    (["sample", "--checkpoint", "absent.pt"], ["--checkpoint", "does not exist"]),
])
def test_bad_options_give_one_error_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--batch-size", "-3"], ["--batch-size"]),
    (["eval", "--batch-size", "0"], ["--batch-size"]),
    (["sample", "--n", "0"], ["--n"]),
    (["sample", "--temperatures", "nan"], ["--temperatures"]),
])
def test_bad_options_of_sample_and_eval(run, capsys, argv, needles):
    assert main([*argv, "--checkpoint", str(run / "checkpoint.pt")]) == 2
    assert_one_error_line(capsys.readouterr().err, *needles)


def test_conv_kwargs_with_unknown_keys_or_wrong_types(tmp_path, capsys):
    out = str(tmp_path / "kw")
    assert main(["train", *TINY, "--steps", "1", "--out-dir", out, "--conv-kwargs", '{"colour": 1}']) == 2
    assert_one_error_line(capsys.readouterr().err, "conv_kwargs", "'colour'", "parametrization")
    assert main(["train", *TINY, "--steps", "1", "--out-dir", out, "--conv-kwargs",
                 '{"parametrization": 5}']) == 2
    assert_one_error_line(capsys.readouterr().err, "parametrization")
    assert not os.path.exists(out)


def test_files_where_folders_belong(run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["train", *TINY, "--out-dir", str(a_file)]) == 2
    assert_one_error_line(capsys.readouterr().err, "--out-dir", "is a file")
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(a_file)]) == 2
    assert_one_error_line(capsys.readouterr().err, "--out", "is a file")
    assert a_file.read_text() == "mine"


def test_one_device_resolver(monkeypatch, run, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    for command in (["sample"], ["eval"], ["edit"]):
        assert main([*command, "--checkpoint", str(run / "checkpoint.pt"), "--device", "cuda"]) == 2
        assert_one_error_line(capsys.readouterr().err, "device", "no CUDA GPU")
    assert main(["train", "--device", "cuda:0"]) == 2
    assert_one_error_line(capsys.readouterr().err, "--device", "no CUDA GPU")


# ------------------------------------------------------------------------------------------------------------
# checkpoints and artefacts


def _flip_a_weight_byte(path: str) -> None:
    ckpt = torch.load(path, weights_only=True)
    name, tensor = max(ckpt["model"].items(), key=lambda kv: kv[1].numel())
    raw = open(path, "rb").read()
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()[:32]
    at = raw.find(needle)
    assert at >= 0, "the weight's bytes are stored uncompressed"
    damaged = bytearray(raw)
    damaged[at + 17] ^= 0x10
    open(path, "wb").write(bytes(damaged))


def test_a_flipped_byte_in_a_weight_is_caught_on_load(run, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((run / "checkpoint.pt").read_bytes())
    _flip_a_weight_byte(str(path))
    with pytest.raises(RuntimeError, match=r"corrupt: the stored model does not match its sha256"):
        load_checkpoint(str(path))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "sha256")
    path.write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, str(path), "truncated")


def test_checkpoint_with_unknown_model_settings(run, tmp_path, capsys):
    ckpt = load_checkpoint(str(run / "checkpoint.pt"))
    ckpt["model_config"]["wings"] = 2
    ckpt.pop("checksums")
    path = tmp_path / "odd.pt"
    save_checkpoint(ckpt, str(path))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, "wings")


def test_a_full_disk_is_named_and_leaves_the_old_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(b"old", str(target))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RuntimeError, match=f"no space left writing {target}"):
        atomic_write_bytes(b"new", str(target))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["metrics.json"]
    out = tmp_path / "full"
    assert main(["train", *TINY, "--steps", "1", "--out-dir", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "no space left writing", str(out))


def test_every_artefact_is_written_atomically(tmp_path, monkeypatch):
    # A crash inside any write (here: at the rename) leaves no partial file under its real name.
    out = tmp_path / "atomic"
    real_replace = os.replace
    seen = []

    def replace_then_crash(src, dst):
        seen.append(os.path.basename(dst))
        if dst.endswith("loss.png"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(preset="digits-tiny", steps=1, out_dir=str(out), n_samples=2, temperatures=(1.0,)),
              progress=False)
    assert {"config.json", "checkpoint.pt", "metrics.json", "loss.png", "step_000001_T1.00.png"} <= set(seen)
    assert not (out / "loss.png").exists()
    assert not [f for f in os.listdir(out) if ".tmp" in f]


# ------------------------------------------------------------------------------------------------------------
# interrupted training


def _state(path) -> dict:
    return load_checkpoint(str(path))["model"]


def _wait_until_training(proc, out, timeout=240.0) -> bool:
    """Until ``proc`` holds the run folder and has written its config.json (it then enters the training loop)."""
    deadline = time.monotonic() + timeout
    locked_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if locked_at is None and f"pid {proc.pid} " in (out / ".lock").read_text():
                locked_at = time.time()
            if locked_at is not None and (out / "config.json").stat().st_mtime >= locked_at - 0.05:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def test_sigint_and_sigkill_at_random_moments_then_resume_to_the_same_parameters(tmp_path):
    steps = ["--steps", "24", "--checkpoint-every", "5", "--batch-size", "16"]
    reference = train(TrainConfig(preset="digits-tiny", steps=24, checkpoint_every=5, batch_size=16,
                                  eval_every=1000, sample_every=1000, n_samples=2, temperatures=(1.0,),
                                  out_dir=str(tmp_path / "straight")), progress=False)
    out = tmp_path / "killed"
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kills = [signal.SIGINT, signal.SIGKILL]
    rng.shuffle(kills)
    log = []
    for sig in kills + [None]:
        proc = _cli("train", *TINY, *steps, "--out-dir", str(out), "--resume", cwd=tmp_path)
        if sig is not None and _wait_until_training(proc, out):
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        log.append((sig, proc.returncode, err[-300:]))
        if sig is None or proc.returncode == 0:
            assert proc.returncode == 0, log
        elif sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, log
        else:
            # 130 from the command; CPython itself ends with SIGINT (-2 here, 130 in a shell) when the signal came
            # while C code ran Python source (e.g. an extension's import) before the handler was installed.
            assert proc.returncode in (130, -signal.SIGINT), log
            assert "Traceback" not in err, log
            if "interrupted" not in err:
                # The signal came after the run had finished and restored Python's handlers (the interpreter was
                # shutting down): silent, and nothing to lose, since the last checkpoint is the final one.
                assert proc.returncode == -signal.SIGINT, log
                assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 24, log
    # A SIGKILL may leave a temporary file (never a torn real one); the next run into the folder removes it.
    assert not [f for f in os.listdir(out) if ".tmp" in f], log
    final = load_checkpoint(str(out / "checkpoint.pt"))
    assert final["step"] == 24, log
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(final["model"][name], value), (name, log)
    assert final["history"]["train_bpd"] == reference["history"]["train_bpd"], log


def test_sigint_mid_run_saves_that_step_exits_130_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    import cinc_kernels.flow.train as train_module

    args = [*TINY, "--steps", "9", "--checkpoint-every", "100", "--batch-size", "16"]
    reference = train(TrainConfig(preset="digits-tiny", steps=9, checkpoint_every=100, batch_size=16,
                                  eval_every=1000, sample_every=1000, n_samples=2, temperatures=(1.0,),
                                  out_dir=str(tmp_path / "straight")), progress=False)
    real, calls = train_module.dequantize, []

    def dequantize_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # the ActNorm initialisation, then the 4th training step
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(train_module, "dequantize", dequantize_then_ctrl_c)
    out = tmp_path / "ctrl_c"
    assert main(["train", *args, "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) at step 4" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 4  # saved though checkpoint-every is 100
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    monkeypatch.undo()
    assert main(["train", *args, "--out-dir", str(out), "--resume"]) == 0
    final = load_checkpoint(str(out / "checkpoint.pt"))
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(final["model"][name], value), name
    assert final["history"]["train_bpd"] == reference["history"]["train_bpd"]


# ------------------------------------------------------------------------------------------------------------
# the benchmark's options


@pytest.mark.parametrize("argv, needles", [
    (["--layers", "nope"], ["--layers", "'nope'"]),
    (["--sizes", "abc"], ["--sizes", "'abc'"]),
    (["--batch", "0"], ["--batch"]),
    (["--quick", "--batch", "0"], ["--batch"]),
    (["--min-time", "nan"], ["--min-time"]),
    (["--kernel-size", "9"], ["--kernel-size"]),
    (["--min-reps", "5", "--max-reps", "2"], ["--min-reps"]),
])
def test_bench_option_mistakes_are_one_line(capsys, argv, needles):
    from cinc_kernels.__main__ import main as package_main

    with pytest.raises(SystemExit) as exit_:
        package_main(["bench", *argv])
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err, *needles)


def test_bench_quick_fills_only_what_was_not_given():
    from cinc_kernels.bench import parse_args

    quick = parse_args(["--quick", "--device", "cpu"])
    assert (quick.batch, quick.size_sweep, quick.rounds) == (2, [4, 8], 1)
    mixed = parse_args(["--quick", "--device", "cpu", "--batch", "3", "--sizes", "5,7"])
    assert (mixed.batch, mixed.size_sweep, mixed.rounds) == (3, [5, 7], 1)
    full = parse_args(["--device", "cpu"])
    assert (full.batch, full.size_sweep, full.min_time) == (8, [8, 16, 32, 64], 0.06)
