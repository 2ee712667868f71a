"""Likelihood and speed of CInC Flow at equal budget across invertible convolutions and couplings (docs/spec.md §4).

Trains, with one budget (data, model size, steps, batch, seeds), flows that differ only in the convolution, the
coupling and the permutation each convolution's own flow step carries (see ``CONFIGS``): CInC and autoregressive
with the paper's step (``permutation="reverse"``), CInC with an LU 1×1 as an ablation, Emerging (whose layer holds
its 1×1) and Glow's 1×1 with none, FInC with the 1×1 of its own step; then CInC's step varied (the authors' exact
step ``"paper"``, a fixed random channel shuffle, ``CInCConv2d(init="rotation")``, labelled e.g.
``cinc[rotation]+quad+shuffle``). For each run it records test bits/dim (with ``--eval-every``, also its curve), free
parameters (whole model and convolutions alone), training images/s, and the time to sample 100 images and to
evaluate their density. Every finished run is appended to ``runs.jsonl`` and the tables are rewritten at once, so an
interrupted comparison keeps its finished runs and continues where it stopped when started again with the same
arguments. Outputs: ``results.json`` (every run, with machine and versions), ``results.csv`` (long format),
``results.md`` (mean ± standard deviation over seeds), ``results.png`` and ``progress.log``.

    python experiments/compare_convs.py                          # the digits, digits-small, 1500 steps, 3 seeds
    python experiments/compare_convs.py --data photos --preset cifar10-small --steps-per-level 2 ...
    python experiments/compare_convs.py --quick                  # smoke run: 1 seed, digits-tiny, 20 steps

``--paper-timing`` instead times sampling and the forward pass of the paper's CIFAR-10-sized model (3 levels × 32
steps, 512 hidden; random near-identity weights, no training) for 100 images, CInC vs Emerging vs FInC, each with
its paper's coupling (quad for CInC, affine for the others), on the given device (meant for a GPU;
``--timing-preset digits-small`` makes it a CPU-sized check).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cinc_kernels.flow import build_model  # noqa: E402
from cinc_kernels.flow.train import TrainConfig, train  # noqa: E402
from cinc_kernels.nn import LAYERS  # noqa: E402

# (conv, coupling, permutation[, init]): each convolution with the step its own flow uses. Emerging's layer already
# starts with its LU 1×1 and Glow's step is the 1×1; FInC Flow's step is its four-corner unit with a Glow step (1×1),
# here placed before the unit (its groups never mix without it). The rows after them vary CInC's step: the authors'
# exact step ("paper"), a fixed random shuffle instead of the reversal, and the layer's init (the optional 4th
# element, CInCConv2d's ``init``; labelled ``cinc[rotation]+quad+reverse``).
CONFIGS = [("cinc", "quad", "reverse"), ("cinc", "affine", "reverse"), ("cinc", "quad", "1x1"),
           ("emerging", "quad", "none"), ("emerging", "affine", "none"), ("autoregressive", "quad", "reverse"),
           ("1x1", "quad", "none"), ("finc", "quad", "1x1"),
           ("cinc", "quad", "paper"), ("cinc", "quad", "shuffle"), ("cinc", "quad", "reverse", "rotation"),
           ("cinc", "quad", "paper", "rotation"), ("cinc", "quad", "shuffle", "rotation"),
           ("cinc", "affine", "paper"), ("cinc", "affine", "shuffle", "rotation")]


def _config(entry: tuple) -> tuple[str, str, str, str | None]:
    """A ``CONFIGS`` entry as ``(conv, coupling, permutation, init)``, ``init`` ``None`` for the layer's default."""
    conv, coupling, permutation, *rest = entry
    return conv, coupling, permutation, rest[0] if rest else None


def _row_config(row: dict) -> tuple[str, str, str, str | None]:
    """The configuration a ``runs.jsonl`` row ran (rows from before the init option have none)."""
    return row["conv"], row["coupling"], row["permutation"], row.get("init")


def _label(conv: str, coupling: str, permutation: str, init: str | None = None) -> str:
    return f"{conv}{f'[{init}]' if init else ''}+{coupling}+{permutation}"


def _conv_kwargs(init: str | None) -> dict:
    return {"init": init} if init else {}


def _machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device, repeats: int = 3) -> float:
    fn()  # warm-up (kernel selection, caches)
    times = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return min(times)


def _conv_parameters(model) -> int:
    """Free parameters of the steps' invertible linear layers: the convolution and, with ``permutation="1x1"``,
    the step's LU 1×1 (so that every row counts the 1×1 its step carries, inside the layer or beside it)."""
    layers = [m for level in model.levels for step in level.steps for m in (step.conv, step.mix) if m is not None]
    return sum(m.num_parameters() if hasattr(m, "num_parameters") else sum(p.numel() for p in m.parameters())
               for m in layers)


@torch.no_grad()
def _speed(model, n: int, device, repeats: int) -> tuple[float, float]:
    """Seconds to sample ``n`` images and to evaluate the log-density of ``n`` images."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(0)
    sample = _best_time(lambda: model.sample(n, 1.0, generator=g), device, repeats)
    x = model.sample(n, 1.0, generator=g).clamp(0, 0.999)
    forward = _best_time(lambda: model.log_prob(x), device, repeats)
    return sample, forward


def _log(args, text: str) -> None:
    line = f"{datetime.datetime.now(datetime.timezone.utc).strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(os.path.join(args.out, "progress.log"), "a") as f:
        f.write(line + "\n")


def _load_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recount(rows: list[dict]) -> None:
    """Each row's parameter counts recomputed from the model it describes, so that a counting rule changed after some
    runs (``runs.jsonl`` keeps what was counted then) applies to every row of a table."""
    from cinc_kernels.flow.data import load_data

    shapes = {}
    for r in rows:
        b = r["budget"]
        if (b["data"], b["image_size"]) not in shapes:
            shapes[b["data"], b["image_size"]] = load_data(b["data"], image_size=b["image_size"]).shape
        c, h, _ = shapes[b["data"], b["image_size"]]
        model = build_model(b["preset"], in_channels=c, image_size=h, levels=b["levels"],
                            steps_per_level=b["steps_per_level"], hidden_channels=b["hidden_channels"],
                            conv=r["conv"], coupling=r["coupling"], permutation=r["permutation"],
                            conv_kwargs=_conv_kwargs(r.get("init")))
        r["parameters"], r["conv_parameters"] = model.num_parameters(), _conv_parameters(model)


def rewrite_report(args) -> None:
    """Rebuild the tables of ``args.out`` from its ``runs.jsonl`` (parameter counts recomputed from the models the
    rows describe, so that a counting rule changed after the runs applies to all of them)."""

    rows = _load_rows(os.path.join(args.out, "runs.jsonl"))
    if not rows:
        raise SystemExit(f"error: --report: no runs in {os.path.join(args.out, 'runs.jsonl')}")
    with open(os.path.join(args.out, "results.json")) as f:
        meta = json.load(f)["meta"]
    _recount(rows)
    _write_all(rows, meta, args.out)
    print(open(os.path.join(args.out, "results.md")).read())


def run_comparison(args) -> None:
    from cinc_kernels.flow.data import describe, load_data

    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.jsonl")
    budget = {"data": args.data, "image_size": args.image_size, "preset": args.preset, "levels": args.levels,
              "steps_per_level": args.steps_per_level, "hidden_channels": args.hidden_channels,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds}
    rows = [r for r in _load_rows(runs_path) if r.get("budget") == budget]
    _recount(rows)  # earlier rows were counted by the rule of their day
    done = {(*_row_config(r), r["seed"]) for r in rows}
    data = load_data(args.data, image_size=args.image_size)
    _log(args, describe(data))
    configs, skipped = [], []
    for entry in CONFIGS:
        config = _config(entry)
        if args.only and _label(*config) not in args.only:
            continue
        if config[0] not in LAYERS:
            skipped.append(config[0])
            _log(args, f"skip {config[0]}: not in cinc_kernels.nn.LAYERS ({sorted(LAYERS)})")
            continue
        configs.append(config)
    # Seed by seed, so that a comparison stopped early still has every configuration at the seeds it finished.
    todo = [(*c, seed) for seed in args.seeds for c in configs if (*c, seed) not in done]
    _log(args, f"{len(rows)} runs already in {runs_path}; {len(todo)} to go")
    meta = {"machine": _machine(), "budget": budget,
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "skipped_convs": skipped,
            "data_info": data.info}
    started = time.perf_counter()
    for i, (conv, coupling, permutation, init, seed) in enumerate(todo):
        name = f"{conv}{f'-{init}' if init else ''}-{coupling}-{permutation}-s{seed}"
        cfg = TrainConfig(name=name, out_dir=os.path.join(args.run_dir, name), data=args.data,
                          image_size=args.image_size, preset=args.preset, levels=args.levels,
                          steps_per_level=args.steps_per_level, hidden_channels=args.hidden_channels, conv=conv,
                          conv_kwargs=_conv_kwargs(init), coupling=coupling, permutation=permutation,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup=min(200, args.steps // 5), seed=seed, eval_every=args.eval_every or args.steps,
                          sample_every=args.steps, checkpoint_every=args.steps,
                          device=args.device, threads=args.threads, n_samples=36, temperatures=(0.7,))
        _log(args, f"[{i + 1}/{len(todo)}] {name}: training")
        tic = time.perf_counter()
        result = train(cfg, progress=not args.no_progress, data=data)
        wall = time.perf_counter() - tic
        model = result["model"]
        rates = result["history"]["images_per_s"]
        sample_s, forward_s = _speed(model, args.n_sample, args.device, args.repeats)
        history = result["history"]
        row = {"conv": conv, "coupling": coupling, "permutation": permutation, "seed": seed,
               "test_bpd": result["test_bpd"], "parameters": model.num_parameters(),
               "conv_parameters": _conv_parameters(model),
               "train_images_per_s": statistics.median(rates[len(rates) // 10:]), "train_wall_s": wall,
               "sample_s": sample_s, "forward_s": forward_s, "n_sample": args.n_sample,
               "skipped_steps": result["skipped_steps"], "budget": budget, "date": _machine()["date"]}
        if init:
            row["init"] = init
        if args.eval_every:
            row["test_history"] = {"step": history["test_step"], "bpd": history["test_bpd"]}
        rows.append(row)
        with open(runs_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        elapsed = time.perf_counter() - started
        _log(args, f"[{i + 1}/{len(todo)}] {name}: test bpd {row['test_bpd']:.4f}, train {wall:.0f} s, "
                   f"sample {sample_s:.3f} s, forward {forward_s:.3f} s; "
                   f"ETA {elapsed / (i + 1) * (len(todo) - i - 1) / 60:.1f} min")
        _write_all(rows, meta, args.out)
    if rows:
        _write_all(rows, meta, args.out)
        print(open(os.path.join(args.out, "results.md")).read())


def _write_all(rows, meta, out) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=2)
    _write_csv(rows, meta, os.path.join(out, "results.csv"))
    summary = _summarise(rows)
    _write_markdown(summary, meta, os.path.join(out, "results.md"))
    _plot(summary, os.path.join(out, "results.png"))
    if any("curve_step" in s for s in summary):
        _plot_curves(summary, os.path.join(out, "curves.png"))


def _write_csv(rows, meta, path) -> None:
    keys = ["conv", "coupling", "permutation", "seed", "metric", "value", "device", "torch", "date"]
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            conv = r["conv"] + (f"[{r['init']}]" if r.get("init") else "")
            for metric in ("test_bpd", "parameters", "conv_parameters", "train_images_per_s", "sample_s",
                           "forward_s"):
                f.write(f"{conv},{r['coupling']},{r['permutation']},{r['seed']},{metric},{r[metric]},"
                        f"{meta['machine']['cuda_device'] or meta['machine']['processor']},"
                        f"{meta['machine']['torch']},{meta['machine']['date']}\n")


def _summarise(rows) -> list[dict]:
    out = []
    for entry in CONFIGS:
        config = _config(entry)
        group = [r for r in rows if _row_config(r) == config]
        if not group:
            continue
        conv, coupling, permutation, init = config
        s = {"conv": conv + (f"[{init}]" if init else ""), "coupling": coupling, "permutation": permutation,
             "n": len(group)}
        for metric in ("test_bpd", "train_images_per_s", "sample_s", "forward_s"):
            values = [r[metric] for r in group]
            s[metric] = statistics.mean(values)
            s[metric + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        s["parameters"], s["conv_parameters"] = group[0]["parameters"], group[0]["conv_parameters"]
        s["seeds"] = sorted(r["seed"] for r in group)
        curves = [r["test_history"] for r in group if "test_history" in r]
        if curves and all(c["step"] == curves[0]["step"] for c in curves):
            s["curve_step"] = curves[0]["step"]
            s["curve_bpd"] = [statistics.mean(v) for v in zip(*(c["bpd"] for c in curves))]
        out.append(s)
    return out


def _write_markdown(summary, meta, path) -> None:
    m, b = meta["machine"], meta["budget"]
    size = {k: b[k] for k in ("image_size", "levels", "steps_per_level", "hidden_channels") if b.get(k) is not None}
    lines = [
        f"Equal budget on {b['data']}: preset {b['preset']}"
        + "".join(f", {k} {v}" for k, v in size.items())
        + f", {b['steps']} steps × batch {b['batch_size']}, lr {b['lr']}, seeds {b['seeds']}. "
        "Mean ± standard deviation over seeds (n = seeds finished).",
        f"Machine: {m['cuda_device'] or m['processor']}, {m['cpus']} CPUs, {m['threads']} threads, torch "
        f"{m['torch']}, {m['date']}. Command: `{meta['command']}`.",
        "",
        "| conv | coupling | step permutation | n | test bits/dim | parameters | conv + 1×1 parameters | train img/s | "
        "sample 100 (s) | forward 100 (s) | sample / forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['conv']} | {s['coupling']} | {s['permutation']} | {s['n']} | "
                     f"{s['test_bpd']:.4f} ± {s['test_bpd_sd']:.4f} | "
                     f"{s['parameters']:,} | {s['conv_parameters']:,} | {s['train_images_per_s']:.0f} | "
                     f"{s['sample_s']:.4f} | {s['forward_s']:.4f} | {s['sample_s'] / s['forward_s']:.1f} |")
    curves = [s for s in summary if "curve_step" in s]
    if curves:
        steps = max((s["curve_step"] for s in curves), key=len)
        lines += ["", "Test bits/dim during training (mean over seeds; rows run with `--eval-every`):", "",
                  "| conv | coupling | step permutation | " + " | ".join(f"step {t}" for t in steps) + " |",
                  "|---|---|---|" + "---|" * len(steps)]
        for s in curves:
            by_step = dict(zip(s["curve_step"], s["curve_bpd"]))
            cells = [f"{by_step[t]:.4f}" if t in by_step else "" for t in steps]
            lines.append(f"| {s['conv']} | {s['coupling']} | {s['permutation']} | " + " | ".join(cells) + " |")
    if meta["skipped_convs"]:
        lines.append("")
        lines.append(f"Skipped (not installed): {', '.join(meta['skipped_convs'])}.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['conv']}\n{s['coupling']}\n{s['permutation']}" for s in summary]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].bar(labels, [s["test_bpd"] for s in summary], yerr=[s["test_bpd_sd"] for s in summary], capsize=4,
                color="tab:blue")
    lo = min(s["test_bpd"] - s["test_bpd_sd"] for s in summary)
    hi = max(s["test_bpd"] + s["test_bpd_sd"] for s in summary)
    axes[0].set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    axes[0].set_ylabel("test bits / dim (lower is better)")
    axes[1].bar(labels, [s["conv_parameters"] for s in summary], color="tab:green")
    axes[1].set_ylabel("free parameters of conv (+ the step's 1×1)")
    positions = list(range(len(summary)))
    axes[2].bar([p - 0.2 for p in positions], [s["sample_s"] for s in summary], width=0.4,
                yerr=[s["sample_s_sd"] for s in summary], capsize=3, color="tab:red", label="sample")
    axes[2].bar([p + 0.2 for p in positions], [s["forward_s"] for s in summary], width=0.4,
                yerr=[s["forward_s_sd"] for s in summary], capsize=3, color="tab:gray", label="forward (density)")
    axes[2].set_xticks(positions, labels)
    axes[2].set_ylabel("seconds for 100 images")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        if "curve_step" in s:
            ax.plot(s["curve_step"], s["curve_bpd"], "o-", label=f"{s['conv']}+{s['coupling']}+{s['permutation']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test bits / dim (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_paper_timing(args) -> None:
    """Sampling and forward time of the paper-sized model for 100 images, per conv (random weights)."""
    device = torch.device(args.device)
    rows = []
    for conv in ("cinc", "emerging", "finc"):
        if conv not in LAYERS:
            print(f"skip {conv}: not in cinc_kernels.nn.LAYERS")
            continue
        torch.manual_seed(0)
        model = build_model(args.timing_preset, conv=conv, coupling="affine" if conv != "cinc" else "quad")
        model = model.to(device)
        size = model.image_size
        with torch.no_grad():
            model.train()(torch.rand(16, model.in_channels, *size, device=device))  # ActNorm init
        sample_s, forward_s = _speed(model, args.n_sample, device, args.repeats)
        row = {"conv": conv, "preset": args.timing_preset, "n": args.n_sample, "sample_s": sample_s,
               "forward_s": forward_s, "ratio": sample_s / forward_s, "parameters": model.num_parameters()}
        rows.append(row)
        print(json.dumps(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "paper_timing.json"), "w") as f:
        json.dump({"machine": _machine(), "rows": rows}, f, indent=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare_convs", help="results folder (default runs/compare_convs)")
    p.add_argument("--run-dir", default=None, help="folder of the runs' checkpoints (default <out>/runs)")
    p.add_argument("--data", default="digits", help="digits or photos (both bundled)")
    p.add_argument("--image-size", type=int, default=None, help="patch size for photos (default 32)")
    p.add_argument("--preset", default="digits-small")
    p.add_argument("--levels", type=int, default=None, help="override the preset's levels")
    p.add_argument("--steps-per-level", type=int, default=None, help="override the preset's steps per level")
    p.add_argument("--hidden-channels", type=int, default=None, help="override the preset's coupling width")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=None,
                   help="also evaluate the test bits/dim every this many steps and record the curve in each row "
                        "(default: only at the end)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these conv+coupling+permutation configurations, e.g. cinc+affine+reverse or "
                        "cinc[rotation]+quad+shuffle")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-sample", type=int, default=100, help="images for the sampling/forward timings")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (the best one is kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: digits-tiny, 20 steps, seed 0")
    p.add_argument("--paper-timing", action="store_true", help="time the paper-sized model instead")
    p.add_argument("--report", action="store_true", help="only rewrite the tables of --out from its runs.jsonl")
    p.add_argument("--timing-preset", default="cifar10")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.seeds, args.n_sample, args.repeats = "digits-tiny", 20, [0], 16, 1
    if args.only:
        known = {_label(*_config(c)) for c in CONFIGS}
        unknown = [o for o in args.only if o not in known]
        if unknown:
            p.error(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if args.eval_every is not None and args.eval_every < 1:
        p.error(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.run_dir is None:
        args.run_dir = os.path.join(args.out, "runs")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.report:
        rewrite_report(args)
    elif args.paper_timing:
        run_paper_timing(args)
    else:
        run_comparison(args)


if __name__ == "__main__":
    main()
