"""The data a proxy touches per request, from valgrind's lackey trace.

`collect` reads the trace (`--trace-mem=yes`) on stdin and keeps the accesses of
one window of requests: bench/footprint.sh opens the window with a flag file
while the proxy is idle, sends the measured requests, then closes it the same
way, so the window holds exactly those requests. `report` reads what `collect`
kept and prints, per request:

- how many distinct 64-byte lines a request touches, by region (stack, heap,
  the binary's own data, shared libraries) and by the function that touched
  each line first;
- the misses a fully associative LRU cache of each size would take (reuse
  distance), which shows how far the data is from fitting in an L1d.

Usage: footprint.py collect FLAGDIR OUT.pkl  (trace on stdin)
       footprint.py report NAME BINARY N PKL MAPS [NAME BINARY N PKL MAPS ...]
"""

import array
import bisect
import collections
import os
import pickle
import select
import subprocess
import sys

LINE = 64
# Idle this long and the proxy has finished the last request's work (the access
# log's flusher sleeps after a quiet 100 ms).
IDLE_SECONDS = 0.5


def collect(flags, out):
    fd = sys.stdin.fileno()
    go, opened, stop = (os.path.join(flags, f) for f in ("go", "opened", "stop"))
    recording, rest = False, b""
    ins, dat = array.array("Q"), array.array("Q")
    cur = 0
    while True:
        ready, _, _ = select.select([fd], [], [], IDLE_SECONDS)
        if not ready:
            # Idle: the window opens or closes between requests, never inside one.
            if not recording and os.path.exists(go) and not os.path.exists(opened):
                recording, rest = True, b""
                open(opened, "w").close()
            elif recording and os.path.exists(stop):
                break
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        if not recording:
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            # "I  addr,size" for an instruction; " L|S|M addr,size" for data.
            if line[:1] == b"I":
                cur = int(line[3:].split(b",", 1)[0], 16)
            elif line[:2] in (b" L", b" S", b" M"):
                ins.append(cur)
                dat.append(int(line[3:].split(b",", 1)[0], 16) // LINE)
    with open(out, "wb") as f:
        pickle.dump((ins, dat), f)
    print(f"footprint: kept {len(dat)} data accesses", file=sys.stderr)
    open(os.path.join(flags, "done"), "w").close()
    # Drain until the traced process is stopped, so it never blocks on a full pipe.
    while os.read(fd, 1 << 20):
        pass


class Target:
    def __init__(self, name, binary, requests, pkl, maps):
        self.name, self.binary, self.requests = name, binary, int(requests)
        with open(pkl, "rb") as f:
            self.ins, self.dat = pickle.load(f)
        self.regions = []
        for line in open(maps):
            p = line.split()
            lo, hi = (int(x, 16) for x in p[0].split("-"))
            self.regions.append((lo, hi, p[5] if len(p) > 5 else "", p[1]))
        self.regions.sort()
        self.starts = [r[0] for r in self.regions]
        exe = os.path.basename(binary)
        mine = [r for r in self.regions if os.path.basename(r[2]) == exe]
        self.base = min(r[0] for r in mine) if mine else 0
        self.syms = []
        nm = subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True)
        for line in nm.stdout.splitlines():
            p = line.split(" ", 2)
            if len(p) == 3 and p[1] in "tTwW":
                self.syms.append((int(p[0], 16), p[2]))
        self.syms.sort()
        self.sym_addrs = [s[0] for s in self.syms]
        self.fn_cache = {}

    def region(self, addr):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.regions[i][1]:
            return self.regions[i]
        return None

    def kind(self, line):
        r = self.region(line * LINE)
        if r is None:
            return "other"
        if r[2] == "[stack]" or 0x1FF0000000 <= r[0] < 0x2000000000:
            # valgrind puts the main thread's stack there; a current-thread runtime runs on it.
            return "stack"
        if r[2] == "":
            return "heap"
        if os.path.basename(r[2]) == os.path.basename(self.binary):
            return "binary data"
        return "libraries"

    def function(self, ia):
        f = self.fn_cache.get(ia)
        if f is None:
            r = self.region(ia)
            if r and os.path.basename(r[2]) == os.path.basename(self.binary):
                i = bisect.bisect_right(self.sym_addrs, ia - self.base) - 1
                f = self.syms[i][1] if i >= 0 else "?"
            else:
                f = os.path.basename(r[2]) if r else "?"
            self.fn_cache[ia] = f
        return f

    def windows(self):
        """Request-sized slices of the trace (the mean request's length)."""
        n = len(self.dat)
        w = max(1, n // self.requests)
        return [(k, k + w) for k in range(0, n - w + 1, w)]

    def lru_misses(self, sizes):
        """Misses per request of a fully associative LRU cache of each size (bytes)."""
        n = len(self.dat)
        tree = [0] * (n + 2)

        def add(i, v):
            i += 1
            while i <= n + 1:
                tree[i] += v
                i += i & -i

        def prefix(i):
            s, i = 0, i + 1
            while i > 0:
                s += tree[i]
                i -= i & -i
            return s

        last, misses = {}, [0] * len(sizes)
        caps = [s // LINE for s in sizes]
        for t, line in enumerate(self.dat):
            p = last.get(line)
            if p is None:
                d = 1 << 62
            else:
                d = prefix(t - 1) - prefix(p)
                add(p, -1)
            add(t, 1)
            last[line] = t
            for i, c in enumerate(caps):
                if d >= c:
                    misses[i] += 1
        return [m / self.requests for m in misses]

    def lines(self):
        by_kind, by_fn = collections.Counter(), collections.Counter()
        wins = self.windows()
        for lo, hi in wins:
            first = {}
            for t in range(lo, hi):
                first.setdefault(self.dat[t], t)
            for line, t in first.items():
                k = self.kind(line)
                by_kind[k] += 1
                by_fn[(k, self.function(self.ins[t]))] += 1
        n = len(wins)
        return ({k: v / n for k, v in by_kind.items()},
                {k: v / n for k, v in by_fn.items()})


def report(args):
    targets = [Target(*args[i:i + 5]) for i in range(0, len(args), 5)]
    sizes = [16 << 10, 32 << 10, 48 << 10, 64 << 10, 128 << 10]
    kinds = ["stack", "heap", "binary data", "libraries", "other"]
    names = [t.name for t in targets]
    print("| per request | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(targets))
    acc = [len(t.dat) / t.requests for t in targets]
    print("| data accesses | " + " | ".join(f"{a:,.0f}" for a in acc) + " |")
    results = [t.lines() for t in targets]
    for k in kinds:
        vals = [r[0].get(k, 0) for r in results]
        if any(v >= 0.5 for v in vals):
            print(f"| distinct lines: {k} | " + " | ".join(f"{v:,.0f} ({v * LINE / 1024:.1f} KiB)" for v in vals) + " |")
    tot = [sum(r[0].values()) for r in results]
    print("| **distinct lines, all** | " + " | ".join(f"**{v:,.0f} ({v * LINE / 1024:.1f} KiB)**" for v in tot) + " |")
    misses = [t.lru_misses(sizes) for t in targets]
    for i, s in enumerate(sizes):
        print(f"| misses, {s >> 10} KiB fully associative LRU | " + " | ".join(f"{m[i]:,.0f}" for m in misses) + " |")
    for t, r in zip(targets, results):
        print(f"\n{t.name}: distinct lines per request by region and the function that touched each first")
        print("| lines | region | function |")
        print("|---:|---|---|")
        for (k, f), v in sorted(r[1].items(), key=lambda kv: -kv[1])[:30]:
            print(f"| {v:.1f} | {k} | `{f[:100]}` |")


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(sys.argv[2], sys.argv[3])
    else:
        report(sys.argv[2:])
