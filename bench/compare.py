#!/usr/bin/env python3
"""A/B table of a bench/run.sh result directory against one reference target.

Usage: bench/compare.py OUT_DIR [REF]   (REF defaults to "opsgate")

For each target and body size: medians over rounds of req/s, CPU per request,
p99 and non-2xx answers, and the ratios to REF computed round by round (the
targets run back to back in each round) with their median and range. For
req/s a ratio above 1 means faster; for CPU/req below 1 means cheaper.
"""

import json
import os
import statistics
import sys


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    out = sys.argv[1]
    ref = sys.argv[2] if len(sys.argv) > 2 else "opsgate"
    recs = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.strip()]
    runs = [r for r in recs if r["mode"] == "closed" and not r.get("failed")]
    idle = [r for r in recs if r["mode"] == "idle"]
    targets = []
    for r in runs:
        if r["target"] not in targets:
            targets.append(r["target"])
    by = {(r["size"], r["target"], r["round"]): r for r in runs}
    sizes = []
    for r in runs:
        if r["size"] not in sizes:
            sizes.append(r["size"])
    print(f"Closed loop, ratios to `{ref}` per round: median [min–max].\n")
    print("| body | target | req/s | CPU µs/req | p99 µs | non-2xx | req/s ×ref | CPU/req ×ref | req/s per core ×ref |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        rounds = sorted({k[2] for k in by if k[0] == size})
        for t in targets:
            rs = [by[(size, t, n)] for n in rounds if (size, t, n) in by]
            if not rs:
                continue
            rr, cr, pc = [], [], []
            for n in rounds:
                a, b = by.get((size, t, n)), by.get((size, ref, n))
                if not a or not b:
                    continue
                if a.get("rps") and b.get("rps"):
                    rr.append(a["rps"] / b["rps"])
                if a.get("cpu_us_per_req") and b.get("cpu_us_per_req"):
                    cr.append(a["cpu_us_per_req"] / b["cpu_us_per_req"])
                    pc.append(b["cpu_us_per_req"] / a["cpu_us_per_req"])

            def rng(xs):
                if not xs:
                    return "—"
                return f"{med(xs):.3f} [{min(xs):.2f}–{max(xs):.2f}]"

            non2xx = sum(r.get("non_2xx", 0) + r.get("errors", 0) for r in rs)
            total = sum(r.get("requests", 0) for r in rs)
            print(f"| {size} | {t} | {med([r.get('rps') for r in rs]):,.0f} "
                  f"| {med([r.get('cpu_us_per_req') for r in rs]) or 0:.1f} "
                  f"| {med([r.get('p99_us') for r in rs]):,.0f} "
                  f"| {non2xx}/{total} | {rng(rr)} | {rng(cr)} | {rng(pc)} |")
    other = [r.get("core_other_pct") for r in runs if r["target"] != "direct"]
    if other:
        print(f"\nProxy core given to other work during the runs: median {med(other):.0f}%, "
              f"max {max(x for x in other if x is not None):.0f}%.")
    if idle:
        print("\nIdle window (no load): CPU % of one core, RSS")
        print("\n| target | seconds | CPU % | RSS MiB |\n|---|---:|---:|---:|")
        for r in idle:
            if r["target"] == "direct":
                continue
            print(f"| {r['target']} | {r['seconds']:.1f} | {r['cpu_pct']:.2f} | {r['rss_idle_kb'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
