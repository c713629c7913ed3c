#!/usr/bin/env python3
"""Checks that `opsgate inject` on deploy/kubernetes/app-only/ gives the hand-written
example in deploy/kubernetes/ (compared as parsed YAML: comments and key order aside).

    python3 ci/check-inject.py OPSGATE_BIN

The one difference allowed is the one inject cannot make: the app's own listen address
(app-only listens on every interface; with opsgate in front it listens on loopback).
Also checks that injecting the output again changes nothing.
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
IMAGE = "registry.example.com/opsgate:0.1.0"


def load_all(text):
    out = {}
    for doc in yaml.safe_load_all(text):
        if doc:
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def inject(binary, args, stdin=None):
    r = subprocess.run([binary, "inject", *args], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"opsgate inject {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def diff(a, b, path=""):
    """Yields the paths where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                yield f"{path}.{k}: only in {'injected' if k in a else 'hand-written'}"
            else:
                yield from diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: injected {a!r} != hand-written {b!r}"


def main():
    binary = sys.argv[1]
    apponly = sorted(str(p) for p in (K8S / "app-only").glob("*.yaml"))
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["opsgate.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(config)
        f.flush()
        args = ["--no-native-sidecar", "--image", IMAGE, "--config", f.name, *apponly]
        out = inject(binary, args)
        again = inject(binary, ["--no-native-sidecar", "--image", IMAGE, "--config", f.name, "-"], out)
    if again != out:
        sys.exit("inject is not idempotent: injecting its own output changed it")

    got = load_all(out)
    want = {}
    for p in sorted(K8S.glob("*.yaml")):
        want.update(load_all(p.read_text()))
    # The step inject leaves to the user: the app listens on loopback only.
    for c in got[("Deployment", "shop")]["spec"]["template"]["spec"]["containers"]:
        if c["name"] == "app":
            c["args"] = [a.replace("-listen=:3000", "-listen=127.0.0.1:3000") for a in c["args"]]
    problems = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            problems.append(f"{key}: in deploy/kubernetes/ but not made by inject")
        elif key not in want:
            problems.append(f"{key}: made by inject but not in deploy/kubernetes/")
        else:
            problems += [f"{key[0]}/{key[1]}{d}" for d in diff(got[key], want[key])]
    if problems:
        print("opsgate inject on app-only/ differs from the hand-written example:")
        for p in problems:
            print("  " + p)
        sys.exit(1)
    print(f"inject: app-only/ -> {len(got)} objects, same as deploy/kubernetes/; idempotent")


if __name__ == "__main__":
    main()
