"""The CInC paper's parameter table: learnable parameters per layer for n channels, counted by each layer's
``num_parameters()`` beside the paper's formula (CInC 9n² − n(n−1)/2, autoregressive 5n², Emerging 10n²), with the
difference explained term by term. Writes ``experiments/results/param_table.md`` (or ``--out``).

    python experiments/param_table.py
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cinc_kernels.nn import LAYERS  # noqa: E402

CHANNELS = (12, 48, 96, 192, 384)

# (layer name, constructor kwargs, paper formula, our closed form, why they differ)
ROWS = [
    ("cinc", {}, lambda n: 9 * n * n - n * (n - 1) // 2, lambda n: 9 * n * n - n * (n - 1) // 2 + n,
     "+n: our layer has a bias; the paper's count is the kernel alone. Kernel entries agree: 8 full taps (8n²) and "
     "the centre's lower triangle with its diagonal (n(n+1)/2)."),
    ("cinc", {"bias": False}, lambda n: 9 * n * n - n * (n - 1) // 2, lambda n: 9 * n * n - n * (n - 1) // 2,
     "none: the kernel without a bias is exactly the paper's count."),
    ("autoregressive", {}, lambda n: 5 * n * n, lambda n: 4 * n * n + n * (n + 1) // 2 + n,
     "−n(n−1)/2 + n: the paper counts the centre tap as n² entries; only its lower triangle with the diagonal "
     "(n(n+1)/2) is free (the strictly upper half is masked to zero), so 4n² + n(n+1)/2; +n for our bias."),
    ("emerging", {}, lambda n: 10 * n * n, lambda n: n * n + 2 * (4 * n * n - n * (n - 1) // 2) + n,
     "the paper counts two 3×3 masked convolutions at 5n² each (4 full taps and a whole centre). Ours follows "
     "Hoogeboom et al.: an LU 1×1 (n²) and two 2×2 convolutions (k = 2 gives the composite 3×3 receptive field), "
     "each 3 full taps and a triangular centre (3n² + n(n+1)/2), and one bias (+n): 8n² + 2n."),
    ("emerging", {"kernel_size": 3}, lambda n: 10 * n * n,
     lambda n: n * n + 2 * (9 * n * n - n * (n - 1) // 2) + n,
     "with 3×3 kernels our emerging layer is two top-left/bottom-right CInC convolutions (9n² − n(n−1)/2 each), not "
     "two half-masked centred ones, hence about 18n²."),
    ("finc", {}, None, None, "no formula in the CInC paper; four channel groups of n/4, each a 3×3 kernel with a unit "
     "diagonal: 4·(9(n/4)² − (n/4)(n/4−1)/2 − n/4) + n bias."),
    ("1x1", {}, None, lambda n: n * n, "Glow's LU 1×1: n² (L, U and log|diag|), no bias."),
]


def build_table() -> str:
    lines = [
        "Learnable parameters per layer for n channels (3×3 kernels unless said otherwise): `num_parameters()` of "
        "each layer in `cinc_kernels.nn` beside the CInC paper's formula. Written by `python experiments/"
        "param_table.py`.",
        "",
        "| layer | " + " | ".join(f"n = {n}: ours / paper" for n in CHANNELS) + " |",
        "|---|" + "---|" * len(CHANNELS),
    ]
    notes = []
    for name, kwargs, paper, ours_formula, why in ROWS:
        cells = []
        for n in CHANNELS:
            ours = LAYERS[name](n, **kwargs).num_parameters()
            if ours_formula is not None and ours != ours_formula(n):
                raise AssertionError(f"{name} {kwargs} n={n}: num_parameters() {ours} != closed form "
                                     f"{ours_formula(n)}")
            cells.append(f"{ours:,} / {paper(n):,}" if paper else f"{ours:,} / —")
        label = name + (" (" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        notes.append(f"- **{label}**: {why}")
    lines += ["", "Where ours and the paper's differ:", ""] + notes
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "param_table.md"))
    args = p.parse_args(argv)
    table = build_table()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
