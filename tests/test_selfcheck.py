"""`python -m cinc_kernels info | check`: what a newcomer runs first must tell the truth."""
import subprocess
import sys

import torch

from cinc_kernels import backends, reference, selfcheck


def test_check_passes_for_the_installed_backends():
    assert selfcheck.run(verbose=False)


def test_check_catches_a_backend_that_disagrees_with_the_reference(monkeypatch, capsys):
    def off_by_a_little(x, weight, bias, unit_diagonal):
        return reference.forward(x, weight, bias, unit_diagonal) * (1 + 1e-3)

    broken = backends.Backend(name="broken", ops={
        "forward": off_by_a_little, "inverse": reference.inverse,
        "inverse_transpose": reference.inverse_transpose,
        "logdet": lambda w, h, wd, u: reference.logdet(w, h, wd, u).to(w.dtype)})
    monkeypatch.setitem(backends._REGISTRY, "broken", broken)
    assert not selfcheck.run(verbose=True)
    out = capsys.readouterr().out
    assert "FAIL broken" in out and "forward" in out
    assert "ok   broken   float32  inverse" in out


def test_info_lists_every_backend_with_its_state():
    out = subprocess.run([sys.executable, "-m", "cinc_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert f"torch {torch.__version__}" in out
    for name in [b.name for b in backends.all_backends() if b.public]:
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        if name in backends.available_backends():
            assert line.split()[1] == "available", line
        else:
            assert line.split()[1] == "unavailable:" and len(line.split()) > 3, line
