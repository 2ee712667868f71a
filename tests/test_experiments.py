"""The experiment programs under ``experiments/``: the parameter table and a tiny resumable comparison."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tiny problems: extra OpenMP threads only spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_table_counts_match_the_closed_forms_and_the_paper_where_they_should(tmp_path):
    param_table = _load("param_table")
    out = tmp_path / "table.md"
    param_table.main(["--out", str(out)])  # raises if a layer's num_parameters() left its closed form
    text = out.read_text()
    for n in param_table.CHANNELS:
        paper = 9 * n * n - n * (n - 1) // 2
        assert f"{paper:,} / {paper:,}" in text  # the kernel without a bias is exactly the paper's CInC count
    assert text.count("\n- **") == len(param_table.ROWS)


def test_comparison_appends_runs_resumes_and_rebuilds_its_tables(tmp_path, capsys):
    compare = _load("compare_convs")
    out = str(tmp_path / "cmp")
    args = ["--quick", "--no-progress", "--only", "cinc+quad+reverse", "finc+quad+1x1", "--steps", "3",
            "--n-sample", "4", "--out", out]
    compare.main(args)
    rows = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    assert [(r["conv"], r["permutation"]) for r in rows] == [("cinc", "reverse"), ("finc", "1x1")]
    for name in ("results.md", "results.csv", "results.json", "results.png", "progress.log"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    md = open(os.path.join(out, "results.md")).read()
    assert "| cinc | quad | reverse | 1 |" in md and "| finc | quad | 1x1 | 1 |" in md
    compare.main(args)  # a second start finds both runs done and trains nothing
    assert len(open(os.path.join(out, "runs.jsonl")).readlines()) == 2
    assert "2 runs already in" in capsys.readouterr().out
    finc = rows[1]
    compare.main(["--report", "--out", out])
    again = json.load(open(os.path.join(out, "results.json")))["runs"]
    assert again[1]["conv_parameters"] == finc["conv_parameters"] and again[1]["test_bpd"] == finc["test_bpd"]
    with pytest.raises(SystemExit) as exc:
        compare.main(["--only", "cinc+quad", "--out", out])
    assert exc.value.code == 2 and "--only" in capsys.readouterr().err
