"""Writing a benchmark's results: long-format CSV rows appended (the history), the latest Markdown table replaced."""
from __future__ import annotations

import csv
import os


def write_results(out_dir: str, stem: str, rows: list[dict], report: str) -> None:
    """Append ``rows`` to ``out_dir/stem.csv`` (header on first write) and write ``report`` to ``out_dir/stem.md``."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(report + "\n")
    print(f"\nwrote {csv_path} and {md_path}")
