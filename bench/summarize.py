#!/usr/bin/env python3
"""Markdown summary of a bench/run.sh result directory (results.jsonl + env.txt).

Usage: bench/summarize.py bench/out/<timestamp>
Medians over rounds; ratios are to nginx (the reference proxy). For req/s a
ratio above 1 is better; for latency, CPU and RSS below 1 is better.
"""

import json
import os
import statistics
import sys

ORDER = ["direct", "nginx", "haproxy", "opsgate", "opsgate-nolog"]
SIZE_NAME = {"tiny": "tiny (13 B)", "16k": "16 KiB", "1m": "1 MiB"}
REF = "nginx"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0, scale=1.0):
    if x is None:
        return "—"
    return f"{x / scale:,.{nd}f}"


def ratio(x, ref):
    if x is None or not ref:
        return "—"
    return f"{x / ref:.2f}"


def spread(xs):
    xs = [x for x in xs if x]
    if len(xs) < 2:
        return None
    return (max(xs) - min(xs)) / statistics.median(xs)


def main():
    out = sys.argv[1]
    recs = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.strip()]
    env = open(os.path.join(out, "env.txt")).read().strip().splitlines()
    print("# opsgate reverse-proxy benchmark\n")
    print("```")
    print("\n".join(env))
    print("```\n")
    print("Medians over rounds. `×nginx` is the ratio to nginx (req/s: higher is better;")
    print("latency, CPU/req, RSS: lower is better). CPU/req is the proxy process's user+system")
    print("time divided by the requests served; `req/s per core` is its inverse, the rate one fully used core")
    print("would sustain, which holds up better than req/s when other work shares the machine. `spread` is")
    print("(max−min)/median of req/s over rounds.\n")

    for r in recs:
        if r["target"] not in ORDER:
            ORDER.append(r["target"])
    idle = [r for r in recs if r["mode"] == "idle"]
    if idle:
        print("## Idle (before any load)\n")
        print("| target | CPU % of a core | RSS MiB |")
        print("|---|---:|---:|")
        for r in idle:
            print(f"| {r['target']} | {r['cpu_pct']:.2f} | {r['rss_idle_kb'] / 1024:.1f} |")
        print(f"\nover {idle[0]['seconds']:.1f} s; one clock tick (10 ms) is {1 / max(idle[0]['seconds'], 0.01):.2f}% of a core here.\n")

    failed = [r for r in recs if r.get("failed")]
    for mode, title in (("closed", "Closed loop (wrk)"), ("fixed", "Fixed rate (oha, latency-corrected)")):
        sizes = [s for s in ["tiny", "16k", "1m"] if any(r["mode"] == mode and r["size"] == s for r in recs)]
        for size in sizes:
            rows = {}
            for t in ORDER:
                rs = [r for r in recs if r["mode"] == mode and r["size"] == size and r["target"] == t and not r.get("failed")]
                if not rs:
                    continue
                rows[t] = dict(
                    rps=med(r["rps"] for r in rs),
                    p50=med(r["p50_us"] for r in rs),
                    p99=med(r["p99_us"] for r in rs),
                    cpu=med(r.get("cpu_us_per_req") for r in rs),
                    rss_idle=med(r.get("rss_idle_kb") for r in rs),
                    rss=max((r.get("rss_kb") or 0) for r in rs) or None,
                    err=sum((r.get("errors") or 0) + (r.get("non_2xx") or 0) for r in rs),
                    spread=spread([r["rps"] for r in rs]),
                    proxy_core=med(r.get("core_proxy_pct") for r in rs),
                    other=med(r.get("core_other_pct") for r in rs),
                    n=len(rs),
                )
            ref = rows.get(REF, {})
            print(f"## {title}: {SIZE_NAME.get(size, size)} body\n")
            print("| target | req/s | ×nginx | p50 ms | p99 ms | p99 ×nginx | CPU µs/req | CPU ×nginx | req/s per core "
                  "| RSS idle MiB | RSS load MiB | errors + non-2xx | spread | core: proxy % | core: other % |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for t, v in rows.items():
                print(
                    f"| {t} | {fmt(v['rps'])} | {ratio(v['rps'], ref.get('rps'))} "
                    f"| {fmt(v['p50'], 2, 1000)} | {fmt(v['p99'], 2, 1000)} | {ratio(v['p99'], ref.get('p99'))} "
                    f"| {fmt(v['cpu'], 1)} | {ratio(v['cpu'], ref.get('cpu'))} "
                    f"| {fmt(1e6 / v['cpu'] if v['cpu'] else None)} "
                    f"| {fmt(v['rss_idle'], 1, 1024)} | {fmt(v['rss'], 1, 1024)} | {v['err']} "
                    f"| {fmt(v['spread'] * 100 if v['spread'] is not None else None, 0)}% "
                    f"| {fmt(v['proxy_core'] if t != 'direct' else None, 0)} | {fmt(v['other'], 0)} |"
                )
            print()

    # Noise: how much the per-round ratio to nginx moved, and how busy the
    # proxy core was with other work.
    print("## Noise\n")
    print("Per-round req/s ratio to nginx (closed loop), min–max over rounds:\n")
    print("| size | " + " | ".join(t for t in ORDER if t != REF) + " |")
    print("|---|" + "---:|" * (len(ORDER) - 1))
    for size in ["tiny", "16k", "1m"]:
        cells = []
        have = False
        for t in ORDER:
            if t == REF:
                continue
            rs = []
            for r in recs:
                if r["mode"] != "closed" or r["size"] != size or r["target"] != t or r.get("failed"):
                    continue
                n = next((x for x in recs if x["mode"] == "closed" and x["size"] == size
                          and x["target"] == REF and x["round"] == r["round"] and not x.get("failed")), None)
                if n and n.get("rps"):
                    rs.append(r["rps"] / n["rps"])
            if rs:
                have = True
                cells.append(f"{min(rs):.2f}–{max(rs):.2f}")
            else:
                cells.append("—")
        if have:
            print(f"| {SIZE_NAME[size]} | " + " | ".join(cells) + " |")
    print("\nPer-round CPU µs/req (closed loop), min–max over rounds:\n")
    tg = [t for t in ORDER if t != "direct"]
    print("| size | " + " | ".join(tg) + " |")
    print("|---|" + "---:|" * len(tg))
    for size in ["tiny", "16k", "1m"]:
        cells = []
        for t in tg:
            xs = [r["cpu_us_per_req"] for r in recs if r["mode"] == "closed" and r.get("size") == size
                  and r["target"] == t and r.get("cpu_us_per_req")]
            cells.append(f"{min(xs):.1f}–{max(xs):.1f}" if xs else "—")
        if any(c != "—" for c in cells):
            print(f"| {SIZE_NAME[size]} | " + " | ".join(cells) + " |")
    others = [r["core_other_pct"] for r in recs if r.get("core_other_pct") is not None]
    if others:
        si = [r.get("core_softirq_pct", 0) for r in recs if r.get("core_other_pct") is not None]
        st = [r.get("core_steal_pct", 0) for r in recs if r.get("core_other_pct") is not None]
        print(f"\n`core: proxy %` is the share of the proxy core the proxy process got during a run; "
              f"`core: other %` the share that went to anything else (other processes on the machine, "
              f"softirq, steal). On a quiet machine a saturated proxy shows ~100% / small. This run: other "
              f"median {statistics.median(others):.0f}%, max {max(others):.0f}% (softirq median "
              f"{statistics.median(si):.0f}%, steal median {statistics.median(st):.0f}%) over {len(others)} runs; "
              f"in `direct` runs the proxy core is nominally idle, so its `other` is what the rest of the "
              f"machine took when it could.")
    if failed:
        print(f"\n**{len(failed)} run(s) failed** — see raw/ in {out}.")
    print()


if __name__ == "__main__":
    main()
