"""What the Python package adds over the engine: the same computation timed through
`flatmin bench ... --json` (the binary) and through `flatmin.Net` (the package), in one run.

Workloads: float32, batch 128, CIFAR-shaped random inputs, PyTorch-default initialization:
one HVP with its gradient (`bench hvp` / `net.hvp(x, y, v, dtype="f32")`, BatchNorm train as the
bench uses), and the structural exact trace (`bench trace` / `net.trace(..., method="structural",
dtype="f32")`, BatchNorm eval). Each side: one warm-up, then the median of --reps runs; the
Python time includes converting the arrays in and out. The two sides alternate for --rounds
rounds and each reports its best round (a virtual machine's noise moves single medians by
20-30%).

Run from the workspace root after `cargo build --release` and `pip install ./python`:
    python benches/compare/python_overhead.py [--models mlp-s,cnn-s,resnet20] [--reps 10]
Prints a Markdown table: medians in ms and overhead = Python / binary - 1.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import numpy as np

import flatmin


def bench_cli(binary, task, model, reps, threads):
    cmd = [binary, "bench", task, "--model", model, "--batch", "128", "--reps", str(reps), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def bench_py(call, reps):
    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", default="target/release/flatmin")
    p.add_argument("--models", default="mlp-s,cnn-s,resnet20")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        flatmin.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"{cpu_name()}, {flatmin.num_threads()} threads, float32, batch 128, "
          f"best of {a.rounds} rounds of the median of {a.reps}")
    print("| workload | flatmin bench (ms) | Python (ms) | overhead |")
    print("| --- | --- | --- | --- |")
    for model in a.models.split(","):
        net = flatmin.Net.preset(model)
        x = rng.standard_normal((128, *net.input_shape)).astype(np.float32)
        y = rng.integers(0, net.num_classes, 128)
        v = {n: rng.standard_normal(s).astype(np.float32) for n, s in net.param_shapes.items()}
        rows = [
            ("hvp", lambda: net.hvp(x, y, v, dtype="f32", bn_mode="train")),
            ("trace", lambda: net.trace(x, y, method="structural", dtype="f32", bn_mode="eval")),
        ]
        for task, call in rows:
            cli, py = float("inf"), float("inf")
            for _ in range(a.rounds):
                cli = min(cli, bench_cli(os.path.abspath(a.binary), task, model, a.reps, a.threads))
                py = min(py, bench_py(call, a.reps))
            print(f"| {task} {model} | {cli:.2f} | {py:.2f} | {100 * (py / cli - 1):+.1f}% |")


if __name__ == "__main__":
    main()
