"""benchmarks/gpu_check.sh, the one command a GPU session runs, checked without a GPU: a dry run (no build, no GPU)
leaves the archive and the summary in $OUT and ends quickly, and a run stopped by a signal still leaves them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _env(out):
    # No GPU even where one exists: the dry run must not spend one.
    return dict(os.environ, CINC_SKIP_BUILD="1", OUT=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")


def _archive_names(out):
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {os.path.normpath(n) for n in tar.getnames()}


def test_dry_run_packs_its_results_and_ends_quickly(tmp_path):
    t0 = time.monotonic()
    done = subprocess.run(["bash", SCRIPT], env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
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
