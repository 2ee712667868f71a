"""Learning curves of flows trained by ``python -m cinc_kernels.flow train --eval-every N``: test bits/dim against
optimisation steps, per configuration, mean and spread over seeds.

    python experiments/learning_curves.py --runs runs/curves --out experiments/results/curves_photos

Every sub-folder of ``--runs`` that holds a finished run (``config.json`` and ``metrics.json``) is one seed of one
configuration; the configuration is read from the run's ``config.json`` (convolution, its ``conv_kwargs``, coupling,
step permutation) and runs that differ in anything else (data, model size, steps, batch, learning rate) are refused,
since their curves would not be comparable. Outputs in ``--out``: ``curves.csv`` (long format: one row per run and
evaluation), ``curves.md`` (mean test bits/dim per configuration at every evaluation, with the gap to the reference
configuration) and ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

# Settings that must agree between runs for their curves to be compared.
BUDGET_KEYS = ("data", "image_size", "n_bits", "preset", "levels", "steps_per_level", "hidden_channels", "steps",
               "batch_size", "lr", "warmup", "optimizer", "eval_every")


def label(config: dict) -> str:
    init = (config.get("conv_kwargs") or {}).get("init")
    conv = f"{config['conv']}[{init}]" if init and init != "identity" else config["conv"]
    return f"{conv}+{config['coupling']}+{config['permutation']}"


def load_runs(root: str) -> list[dict]:
    runs = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        paths = [os.path.join(folder, f) for f in ("config.json", "metrics.json")]
        if not all(os.path.isfile(p) for p in paths):
            continue
        with open(paths[0]) as f:
            config = json.load(f)
        with open(paths[1]) as f:
            metrics = json.load(f)
        if not metrics.get("test_step") or metrics["test_step"][-1] < config["steps"]:
            print(f"skipping {folder}: not finished (last evaluation at step "
                  f"{(metrics.get('test_step') or [0])[-1]} of {config['steps']})", file=sys.stderr)
            continue
        runs.append({"name": name, "config": config, "label": label(config), "seed": config["seed"],
                     "steps": metrics["test_step"], "test_bpd": metrics["test_bpd"]})
    return runs


def check_budget(runs: list[dict]) -> dict:
    first = runs[0]["config"]
    for run in runs[1:]:
        different = [k for k in BUDGET_KEYS if run["config"].get(k) != first.get(k)]
        if different:
            raise SystemExit(f"error: --runs: {run['name']} differs from {runs[0]['name']} in {', '.join(different)}")
    return {k: first.get(k) for k in BUDGET_KEYS}


def summarise(runs: list[dict]) -> dict:
    """``{label: {step: [bpd per seed]}}``."""
    out: dict = {}
    for run in runs:
        per_step = out.setdefault(run["label"], {})
        for step, bpd in zip(run["steps"], run["test_bpd"]):
            per_step.setdefault(step, []).append(bpd)
    return out


def write_markdown(summary: dict, runs: list[dict], budget: dict, reference: str, command: str, path: str) -> None:
    labels = list(summary)
    steps = sorted({s for per in summary.values() for s in per})
    seeds = {lab: sorted(r["seed"] for r in runs if r["label"] == lab) for lab in labels}
    lines = [
        "Test bits/dim every {} steps (mean over seeds; ± half the range between seeds). Budget: {}.".format(
            budget["eval_every"], ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)),
        "Seeds: " + "; ".join(f"{lab} {seeds[lab]}" for lab in labels) + f". Command: `{command}`.", "",
        "| step | " + " | ".join(labels) + (f" | gap of each CInC row to {reference} |" if reference in summary
                                            else " |"),
        "|---:|" + "---:|" * len(labels) + ("---|" if reference in summary else ""),
    ]
    for step in steps:
        cells, means = [], {}
        for lab in labels:
            values = summary[lab].get(step)
            if not values:
                cells.append("")
                continue
            means[lab] = statistics.mean(values)
            spread = (max(values) - min(values)) / 2
            cells.append(f"{means[lab]:.3f} ± {spread:.3f}")
        row = f"| {step} | " + " | ".join(cells) + " |"
        if reference in means:
            gaps = [f"{lab}: {means[lab] - means[reference]:+.3f}" for lab in labels
                    if lab.startswith("cinc") and lab in means]
            row += " " + ", ".join(gaps) + " |"
        lines.append(row)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for lab, per_step in summary.items():
        steps = sorted(per_step)
        mean = [statistics.mean(per_step[s]) for s in steps]
        ax.plot(steps, mean, marker="o", ms=3, label=lab)
        ax.fill_between(steps, [min(per_step[s]) for s in steps], [max(per_step[s]) for s in steps], alpha=0.2)
    lows = [min(v) for per in summary.values() for v in per.values()]
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("test bits / dim (lower is better)")
    ax.set_title("Learning curves (mean over seeds, band: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder whose sub-folders are training runs")
    p.add_argument("--out", required=True, help="folder for curves.csv, curves.md and curves.png")
    p.add_argument("--reference", default="emerging+quad+none", help="configuration the CInC rows are compared with")
    p.add_argument("--command", default=None, help="how the runs were made, for the report (default: unknown)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        p.error(f"--runs: no folder {args.runs}")
    runs = load_runs(args.runs)
    if not runs:
        p.error(f"--runs: no finished runs under {args.runs}")
    budget = check_budget(runs)
    summary = summarise(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curves.csv"), "w") as f:
        f.write("configuration,seed,step,test_bpd\n")
        for run in runs:
            for step, bpd in zip(run["steps"], run["test_bpd"]):
                f.write(f"{run['label']},{run['seed']},{step},{bpd}\n")
    write_markdown(summary, runs, budget, args.reference, args.command or "unknown",
                   os.path.join(args.out, "curves.md"))
    plot(summary, os.path.join(args.out, "curves.png"))
    print(open(os.path.join(args.out, "curves.md")).read())
    print(f"wrote {args.out}/curves.csv, curves.md and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
