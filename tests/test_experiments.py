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
    # A row counted by an older rule (runs.jsonl keeps what was counted then): the next start recounts it from the
    # model, and a second start finds both runs done and trains nothing.
    stale = [dict(r, parameters=1, conv_parameters=1) if r["conv"] == "cinc" else r for r in rows]
    with open(os.path.join(out, "runs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in stale)
    compare.main(args)
    assert len(open(os.path.join(out, "runs.jsonl")).readlines()) == 2
    assert "2 runs already in" in capsys.readouterr().out
    recounted = json.load(open(os.path.join(out, "results.json")))["runs"][0]
    assert (recounted["parameters"], recounted["conv_parameters"]) == (rows[0]["parameters"],
                                                                        rows[0]["conv_parameters"])
    assert f"| {rows[0]['parameters']:,} |" in open(os.path.join(out, "results.md")).read()
    finc = rows[1]
    compare.main(["--report", "--out", out])
    again = json.load(open(os.path.join(out, "results.json")))["runs"]
    assert again[1]["conv_parameters"] == finc["conv_parameters"] and again[1]["test_bpd"] == finc["test_bpd"]
    with pytest.raises(SystemExit) as exc:
        compare.main(["--only", "cinc+quad", "--out", out])
    assert exc.value.code == 2 and "--only" in capsys.readouterr().err


def test_comparison_rows_with_an_init_and_learning_curves(tmp_path, capsys):
    compare = _load("compare_convs")
    labels = {compare._label(*compare._config(c)) for c in compare.CONFIGS}
    # The rows committed tables already hold keep their labels.
    assert {"cinc+quad+reverse", "emerging+quad+none", "finc+quad+1x1"} <= labels
    assert {"cinc+quad+paper", "cinc+quad+shuffle", "cinc[rotation]+quad+reverse"} <= labels
    out = str(tmp_path / "cmp")
    only = ["--only", "cinc[rotation]+quad+shuffle", "cinc+quad+paper"]
    common = ["--preset", "digits-tiny", "--seeds", "0", "--repeats", "1", "--no-progress", "--steps", "4",
              "--n-sample", "4"]
    compare.main(common + only + ["--eval-every", "2", "--out", out])
    rows = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    assert [(r["permutation"], r.get("init")) for r in rows] == [("paper", None), ("shuffle", "rotation")]
    assert all(r["test_history"]["step"] == [2, 4] and r["test_history"]["bpd"][-1] == r["test_bpd"] for r in rows)
    md = open(os.path.join(out, "results.md")).read()
    assert "| cinc[rotation] | quad | shuffle | 1 |" in md and "| step 2 | step 4 |" in md
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    # Evaluating along the way does not change the run: the same row without --eval-every ends at the same bpd.
    plain = str(tmp_path / "plain")
    compare.main(common + ["--only", "cinc+quad+paper", "--out", plain])
    row = json.loads(open(os.path.join(plain, "runs.jsonl")).readline())
    assert row["test_bpd"] == rows[0]["test_bpd"] and "test_history" not in row
    # --report rebuilds the models with their init and permutation: the same counts.
    compare.main(["--report", "--out", out])
    again = json.load(open(os.path.join(out, "results.json")))["runs"]
    assert [r["parameters"] for r in again] == [r["parameters"] for r in rows]
    with pytest.raises(SystemExit) as exc:
        compare.main(["--eval-every", "0", "--out", out])
    assert exc.value.code == 2 and "--eval-every" in capsys.readouterr().err


def _fake_run(root, name, conv, permutation, seed, curve, steps=400, **overrides):
    folder = root / name
    folder.mkdir(parents=True)
    config = {"data": "photos", "image_size": None, "n_bits": None, "preset": "cifar10-small", "levels": None,
              "steps_per_level": 2, "hidden_channels": 32, "steps": steps, "batch_size": 32, "lr": 1e-3,
              "warmup": 20, "optimizer": "adam", "eval_every": 200, "conv": conv, "conv_kwargs": {},
              "coupling": "quad", "permutation": permutation, "seed": seed}
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps({"test_step": [200 * (i + 1) for i in range(len(curve))],
                                                     "test_bpd": curve}))


def test_learning_curves_average_seeds_report_the_gap_and_refuse_mixed_budgets(tmp_path, capsys):
    curves = _load("learning_curves")
    runs = tmp_path / "runs"
    _fake_run(runs, "a0", "cinc", "reverse", 0, [4.4, 3.9])
    _fake_run(runs, "a1", "cinc", "reverse", 1, [4.2, 3.7])
    _fake_run(runs, "b0", "emerging", "none", 0, [4.0, 3.6])
    _fake_run(runs, "c0", "cinc", "shuffle", 0, [4.1], steps=400)  # unfinished: last evaluation before `steps`
    _fake_run(runs, "d0", "cinc", "reverse", 2, [4.0, 3.5], conv_kwargs={"init": "rotation"})
    out = tmp_path / "out"
    assert curves.main(["--runs", str(runs), "--out", str(out)]) == 0
    table = (out / "curves.md").read_text()
    assert "| 400 | 3.800 ± 0.100 | 3.600 ± 0.000 | 3.500 ± 0.000 |" in table
    assert "cinc+quad+reverse: +0.200" in table and "cinc[rotation]+quad+reverse: -0.100" in table
    assert "shuffle" not in table
    rows = (out / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2 and (out / "curves.png").stat().st_size > 0
    _fake_run(runs, "e0", "1x1", "none", 0, [4.0, 3.9], lr=3e-3)
    with pytest.raises(SystemExit, match="e0 differs .* in lr"):
        curves.main(["--runs", str(runs), "--out", str(out)])
