"""Every program in ``examples/`` runs on tiny sizes and does what its docstring says."""
import importlib.util
import json
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(name, tmp_path, *extra):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    return module.main(["--tiny", "--out", str(out), *extra]), out


@pytest.mark.parametrize("name, library", [("normflows_glow", "normflows"), ("freia_inn", "FrEIA")])
def test_library_examples_train_sample_and_invert(name, library, tmp_path):
    pytest.importorskip(library, reason=f"{library} is not installed (pip install cinc_kernels[test])")
    pytest.importorskip("sklearn", reason="the examples use scikit-learn's bundled digits")
    result, out = _run(name, tmp_path)
    assert result["losses"][-1] < result["losses"][0]
    assert result["round_trip_error"] < 1e-4
    assert pathlib.Path(result["samples"]).is_file() and pathlib.Path(result["samples"]).parent == out


def test_train_cinc_flow_example(tmp_path):
    pytest.importorskip("sklearn", reason="the flow's default data are scikit-learn's bundled digits")
    result, out = _run("train_cinc_flow", tmp_path)
    assert (out / "checkpoint.pt").is_file()
    assert (out / "samples" / "sample_T1.00.png").is_file()
    assert result["round_trip_error"] < 1e-4


def test_deep_flow_inverse_example(tmp_path):
    result, out = _run("deep_flow_inverse", tmp_path)
    assert json.loads((out / "deep_inverse.json").read_text()) == result
    assert result["contractive"]["contraction_bound"] <= 0.9 + 1e-6
    assert result["contractive"]["relative_round_trip_error_float32"] < 1e-4
    assert result["contractive"]["max_inverse_gain"] < 100
    free = result["none"]
    assert free["max_inverse_gain"] > 1e6
    assert not free["relative_round_trip_error_float32"] < 1e-2  # large or NaN: the free stack cannot be inverted
