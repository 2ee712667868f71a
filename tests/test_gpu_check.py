"""tools/gpu_check.sh, the one command a GPU session runs, checked without a GPU.

Read as text: every stage writes under its own folder of the work directory that is packed into $OUT, a trap packs
on every exit, the plan's stages come in the planned order with caps that fit the budget (which leaves the device
call's 480 s room for the final pack), each benchmark stage's arguments parse, ncu is guarded against missing
performance-counter permissions, and Triton does not autotune unless asked. Run: a dry run (no build, no GPU) leaves
the archive and the summary in $OUT and ends quickly, a run stopped by a signal still leaves them, and a rehearsal runs
every benchmark stage on the CPU at tiny shapes.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
DEVICE_CALL_LIMIT_S = 480  # what the device call allows the script, the build included
# The first GPU run's plan, in this order; the stages after it run while the budget lasts.
PLAN = ["build", "info", "correctness", "ops", "ksize", "sweep", "ncu", "finc"]
EXTRAS = ["test_cuda", "test_triton_smoke", "bench_triton", "test_triton_rest"]


def _text() -> str:
    with open(SCRIPT) as f:
        return f.read()


def _calls() -> list[tuple[str, str, int, list[str]]]:
    """(function, stage name, cap in s, the rest of the words) of every stage the script runs, in order."""
    text = re.sub(r"\\\n\s*", " ", _text())  # join continued lines
    calls = []
    for line in text.splitlines():
        words = shlex.split(line.split(" #")[0]) if line.strip() and not line.lstrip().startswith("#") else []
        if words[:1] == ["elif"] and words[1:3] == ["!", "stage"]:  # the build: elif ! stage build CAP ...; then
            words = [w.rstrip(";") for w in words[2:-1]]
        if words[:1] in (["stage"], ["pytest_stage"], ["bench"]) and len(words) > 2 and words[2].isdigit():
            calls.append((words[0], words[1], int(words[2]), words[3:]))
    return calls


def test_the_plan_comes_first_and_in_order():
    names = [name for _, name, _, _ in _calls()]
    assert names == PLAN + EXTRAS, names


def test_the_plan_fits_the_budget_and_the_budget_fits_the_device_call():
    budget = int(re.search(r'BUDGET="\$\{CINC_GPU_CHECK_BUDGET_S:-(\d+)\}"', _text()).group(1))
    assert budget <= DEVICE_CALL_LIMIT_S - 10, "leave the final pack and the start some seconds"
    caps = {name: cap for _, name, cap, _ in _calls()}
    assert sum(caps[name] for name in PLAN) <= budget, caps
    assert all(cap <= budget for cap in caps.values()), caps


def test_every_stage_writes_under_its_own_folder_that_is_packed_into_out():
    text = _text()
    # stage() logs each command into $WORK/NAME/log.txt, and pack() archives $WORK into $DEST, which is $OUT.
    assert 'DEST="${OUT:-' in text
    assert '> "$WORK/$name/log.txt"' in text
    assert 'tar czf "$DEST/gpu_check.tar.gz.tmp" -C "$WORK" .' in text
    for function, name, _, words in _calls():
        if function == "bench":
            continue  # bench() passes --out "$WORK/NAME" itself
        for flag, value in itertools.pairwise(words):
            if flag in ("--out", "--export") or flag.startswith("--junitxml"):
                assert value.startswith(f"$WORK/{name}"), (name, flag, value)
        for word in words:
            if word.startswith("--junitxml="):
                assert word.startswith(f"--junitxml=$WORK/{name}/"), (name, word)
    assert 'benchmarks/bench_gpu.py "$@" --out "$WORK/$name"' in text


def test_a_trap_packs_on_every_exit():
    text = _text()
    assert "trap finish EXIT" in text
    assert re.search(r"trap '.*exit 143' INT TERM", text)
    finish = text[text.index("finish() {"):text.index("trap finish EXIT")]
    assert "pack" in finish


def test_every_benchmark_stage_parses():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    benches = [(name, words) for function, name, _, words in _calls() if function == "bench"]
    assert {words[0] for _, words in benches} >= {"correctness", "ops", "sweep", "finc"}
    for name, words in benches:
        args = bench_gpu.parser().parse_args([*words, "--out", "/tmp/unused"])
        assert args.part == words[0], name
    sweep = bench_gpu.parser().parse_args(next(words for name, words in benches if name == "sweep"))
    assert sweep.batches == [1, 16, 132, 264] and sweep.channels == [48]
    # The sweep's overrides are the variables the CUDA launcher reads at each call.
    launcher = (Path(__file__).resolve().parents[1] / "csrc/cuda/cinc_cuda_wavefront.cu").read_text()
    read = set(re.findall(r'environment_int\("([A-Z_]+)"\)', launcher))
    assert {bench_gpu.THREADS_ENV, bench_gpu.BLOCKS_PER_IMAGE_ENV} == read


def test_ncu_is_guarded_and_triton_does_not_autotune_by_default():
    text = _text()
    assert "command -v ncu" in text and "ERR_NVGPUCTRPERM" in text
    assert 'export CINC_TRITON_AUTOTUNE="${CINC_TRITON_AUTOTUNE:-0}"' in text


def _env(out, **extra):
    # No GPU even where one exists: the dry run must not spend one.
    return dict(os.environ, CINC_SKIP_BUILD="1", OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
                **extra)


def _archive_names(out):
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {os.path.normpath(n) for n in tar.getnames()}


def test_dry_run_packs_its_results_and_ends_quickly(tmp_path):
    t0 = time.monotonic()
    done = subprocess.run(["bash", SCRIPT], env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.tar.gz", "summary.txt"]
    assert {"environment.txt", "stages.txt", "summary.txt", "info/log.txt"} <= _archive_names(tmp_path)
    summary = (tmp_path / "summary.txt").read_text()
    for line in ("build: skipped (CINC_SKIP_BUILD=1)", "info: ok", "GPU stages: skipped, no CUDA GPU is visible",
                 "finished: exit 0"):
        assert line in summary, summary
    assert took < 120, f"the dry run took {took:.0f} s"


def test_a_run_stopped_by_a_signal_still_leaves_its_results(tmp_path):
    proc = subprocess.Popen(["bash", SCRIPT], env=_env(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "summary.txt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the dry run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143
    summary = (tmp_path / "summary.txt").read_text()
    assert "stopped by a signal" in summary and "finished: exit 143" in summary, summary
    assert "environment.txt" in _archive_names(tmp_path)


def test_rehearsal_runs_every_benchmark_stage_on_the_cpu(tmp_path):
    import cinc_kernels as ck

    why = ck.backends.get_backend("cpu").unavailable()
    if why is not None:
        pytest.skip(f"the rehearsal runs the cpu backend in place of cuda: {why}")
    done = subprocess.run(["bash", SCRIPT], env=_env(tmp_path, CINC_GPU_CHECK_REHEARSAL="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    names = _archive_names(tmp_path)
    for stage in ("correctness", "ops", "ksize", "sweep", "finc"):
        assert f"{stage}: ok" in summary, summary
        assert {f"{stage}/log.txt", f"{stage}/summary.txt", f"{stage}/gpu_bench.csv"} <= names, (stage, names)
    assert "ncu: skipped, no GPU" in summary and "finished: exit 0" in summary
