#!/usr/bin/env python3
"""Medians and ratios from the last `cargo bench --bench check` run.

Reads target/criterion/**/new/{benchmark,estimates}.json and prints, per
group, each benchmark's median time per check (with criterion's 95%
confidence interval of the median), the matching throughput, and its ratio
to the group's `governor` benchmark (>1 means slower than governor).

Usage: python3 scripts/bench/criterion-summary.py [target/criterion]
"""

import json
import pathlib
import sys


def load(root):
    rows = []
    for bench in sorted(root.glob("**/new/benchmark.json")):
        est_path = bench.with_name("estimates.json")
        if not est_path.exists():
            continue
        meta = json.loads(bench.read_text())
        est = json.loads(est_path.read_text())
        median = est["median"]
        name = meta["function_id"] or ""
        if meta.get("value_str"):
            name += f" ({meta['value_str']} threads)"
        rows.append(
            {
                "group": meta["group_id"],
                "name": name,
                "governor": (meta["function_id"] or "").startswith("governor"),
                "ns": median["point_estimate"],
                "lo": median["confidence_interval"]["lower_bound"],
                "hi": median["confidence_interval"]["upper_bound"],
            }
        )
    return rows


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    rows = load(root)
    if not rows:
        sys.exit(f"no criterion results under {root}; run `cargo bench --bench check` first")
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    print(f"{'group':<22} {'benchmark':<36} {'median ns/check':>16} {'95% CI':>17} {'Mchecks/s':>10} {'vs governor':>12}")
    for group, items in groups.items():
        base = next((r["ns"] for r in items if r["governor"]), None)
        for r in sorted(items, key=lambda r: (r["governor"], r["name"])):
            ratio = f"{r['ns'] / base:.2f}x" if base else "-"
            ci = f"{r['lo']:.1f}-{r['hi']:.1f}"
            print(
                f"{group:<22} {r['name']:<36} {r['ns']:>16.1f} {ci:>17} {1e3 / r['ns']:>10.2f} {ratio:>12}"
            )


if __name__ == "__main__":
    main()
