"""Side-by-side timing of flatmin and PyTorch on the same machine, in one run, as ratios.

PyTorch side: the anchor scripts (../shared/anchors/bench_torch.py: eager gradient, HVP by
double backward and torch.func, batched HVP by vmap), copied to a scratch folder and run
there. flatmin side: `flatmin bench ... --json` (release build). Same workloads: float32,
batch 128, CIFAR-shaped random inputs, PyTorch-default initialization, BatchNorm in train mode.

Also SGEMM against torch.mm on square sizes and on the mlp-s layers' own shapes, with flatmin's
fraction of the FMA peak it measures in-process (`flatmin bench gemm` reports it).

Run from the workspace root after `cargo build --release`:
    /path/to/venv/bin/python benches/compare/compare.py [--threads 2] [--anchors ../shared/anchors]
Prints a Markdown table: medians in ms and speedup = PyTorch time / flatmin time (> 1: flatmin
faster). The machine is described by `lscpu`'s model name and the versions are printed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

MODELS = {"mlp-s": "mlp_s", "cnn-s": "cnn_s", "resnet20": "resnet20"}


def torch_runs(py, anchors, threads, out):
    scratch = tempfile.mkdtemp(prefix="flatmin-compare-")
    for f in ["bench_torch.py", "common.py"]:
        shutil.copy(os.path.join(anchors, f), scratch)
    env = dict(os.environ, ANCHOR_OUT=out)
    run = lambda *a: subprocess.run([py, "bench_torch.py", "--threads", str(threads), *a], cwd=scratch, env=env,
                                    check=True, stdout=subprocess.DEVNULL)
    run("--task", "grad", "--models", ",".join(MODELS.values()))
    for m in MODELS.values():
        for method in ["double", "func"]:
            run("--task", "hvp", "--model", m, "--method", method)
    for m in ["mlp_s", "cnn_s"]:
        run("--task", "bhvp", "--model", m, "--method", "func_vmap", "--nvec", "16")
    shutil.rmtree(scratch, ignore_errors=True)


# SGEMM shapes compared with torch.mm: squares, and the mlp-s layers' own products at batch 128
# (forward X Wᵀ, weight gradient dYᵀ X, input gradient dY W).
GEMM_SHAPES = [((512, 512, 512), "nn"), ((1024, 1024, 1024), "nn"), ((2048, 2048, 2048), "nn"),
               ((128, 3072, 256), "nt"), ((256, 128, 3072), "tn"), ((128, 256, 3072), "nn")]

TORCH_GEMM = r"""
import json, sys, time, torch
threads, reps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
for spec in sys.argv[3:]:
    (m, k, n), layout = [int(x) for x in spec.split(":")[0].split("x")], spec.split(":")[1]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(k, m, generator=g).t() if layout == "tn" else torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g).t() if layout == "nt" else torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); torch.mm(a, b, out=out); ts.append(time.perf_counter() - t)
    ts.sort()
    print(json.dumps({"shape": [m, k, n], "layout": layout, "median_ms": 1e3 * ts[len(ts) // 2],
                      "gflops": 2 * m * k * n / ts[len(ts) // 2] / 1e9}))
"""


def gemm_table(py, binary, threads, reps):
    """torch.mm against `flatmin bench gemm` on GEMM_SHAPES; rows of (label, torch GFLOP/s,
    flatmin GFLOP/s, flatmin's fraction of the measured FMA peak)."""
    specs = [f"{m}x{k}x{n}:{lay}" for (m, k, n), lay in GEMM_SHAPES]
    out = subprocess.run([py, "-c", TORCH_GEMM, str(threads), str(reps), *specs], check=True,
                         capture_output=True, text=True).stdout
    torch_recs = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    rows = []
    for ((m, k, n), lay), t in zip(GEMM_SHAPES, torch_recs):
        f = flatmin(binary, threads, "gemm", "--shape", f"{m}x{k}x{n}", "--layout", lay, "--reps", str(reps))
        rows.append((f"{m}x{k}x{n} {lay.upper()}", t["gflops"], f["gflops"], f.get("peak_fraction")))
    return rows


def flatmin(binary, threads, *args):
    """Runs `flatmin bench ARGS --json` in its own process; returns its JSON line with the
    process's peak resident memory (ru_maxrss) added as maxrss_mb."""
    p = subprocess.Popen([binary, "bench", *args, "--threads", str(threads), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"flatmin bench {' '.join(args)} failed with {p.returncode}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec["maxrss_mb"] = usage.ru_maxrss / 1024.0
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", default="../shared/anchors")
    ap.add_argument("--flatmin", default="target/release/flatmin")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mm-bench", help="the anchors' mm-bench binary built with feature threading "
                    "(../shared/anchors/mm-bench): standalone matrixmultiply SGEMM beside the engine's")
    a = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    torch_runs(sys.executable, a.anchors, a.threads, out)
    recs = [json.loads(l) for l in open(out)]
    os.unlink(out)

    def torch_rec(suite, model, method=None):
        for r in recs:
            if r.get("suite") == suite and r.get("model") == MODELS[model] and (method is None or r.get("method") == method):
                return r
        return {}

    def torch_ms(suite, model, method=None):
        r = torch_rec(suite, model, method)
        if not r:
            return float("nan")
        return r["median_ms"] if suite != "bhvp" else r["per_vector_ms"]

    rows, mem = [], []
    for m in MODELS:
        reps = str(a.reps if m != "resnet20" else max(3, a.reps // 3))
        g = flatmin(a.flatmin, a.threads, "grad", "--model", m, "--reps", reps)
        h = flatmin(a.flatmin, a.threads, "hvp", "--model", m, "--reps", reps)
        tg = torch_ms("grad", m)
        rows.append((f"gradient, {m}", tg, g["median_ms"]))
        th = min(torch_ms("hvp", m, "double"), torch_ms("hvp", m, "func"))
        rows.append((f"HVP, {m} (torch: faster of double backward / torch.func)", th, h["median_ms"]))
        rows.append((f"HVP / gradient, {m}", th / tg, h["median_ms"] / h["grad_ms"]))
        rss = torch_rec("hvp", m, "double").get("maxrss_mb", float("nan"))
        mem.append((f"peak RSS of an HVP process, {m} (torch: double backward)", rss, h["maxrss_mb"]))
        if m != "resnet20":
            b = flatmin(a.flatmin, a.threads, "hvp-batched", "--model", m, "--vectors", "16", "--reps", str(max(3, a.reps // 2)))
            rows.append((f"batched HVP x16 per direction, {m} (torch: vmap)", torch_ms("bhvp", m, "func_vmap"), b["median_ms"] / 16))
    one = flatmin(a.flatmin, 1, "grad", "--model", "cnn-s", "--reps", str(a.reps))
    two = flatmin(a.flatmin, 2, "grad", "--model", "cnn-s", "--reps", str(a.reps))
    gemm = flatmin(a.flatmin, a.threads, "gemm", "--size", "1024", "--reps", str(a.reps))
    gemm_rows = []
    if a.mm_bench:
        env = dict(os.environ, MATMUL_NUM_THREADS=str(a.threads))
        out = subprocess.run([a.mm_bench, "512", "1024"], env=env, check=True, capture_output=True, text=True).stdout
        mm = {r["n"]: r for r in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}
        for n in [512, 1024]:
            g = flatmin(a.flatmin, a.threads, "gemm", "--size", str(n), "--reps", str(a.reps))
            gemm_rows.append((n, mm[n]["gflops_median"], g["gflops"]))
    gemms = gemm_table(sys.executable, a.flatmin, a.threads, max(10, a.reps))
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | head -1"], capture_output=True, text=True).stdout.strip()
    torch_version = next((r.get("torch_version") for r in recs if r.get("torch_version")), "?")
    print(f"machine: {cpu}, {a.threads} threads; torch {torch_version}; flatmin SGEMM 1024: {gemm['gflops']:.1f} GFLOP/s\n")
    print("| workload (float32, batch 128) | PyTorch ms | flatmin ms | speedup |")
    print("| --- | --- | --- | --- |")
    for name, t, f in rows:
        if name.startswith("HVP / gradient"):
            print(f"| {name} | {t:.2f}x | {f:.2f}x | — |")
        else:
            print(f"| {name} | {t:.1f} | {f:.1f} | {t / f:.2f}x |")
    print("\n| memory | PyTorch MB | flatmin MB | ratio |")
    print("| --- | --- | --- | --- |")
    for name, t, f in mem:
        print(f"| {name} | {t:.0f} | {f:.0f} | {t / f:.2f}x |")
    print("\n| SGEMM (M x K x N, layout) | torch.mm GFLOP/s | flatmin GFLOP/s | speedup | flatmin % of FMA peak |")
    print("| --- | --- | --- | --- | --- |")
    for name, t, f, frac in gemms:
        pk = f"{100 * frac:.0f}%" if frac else "—"
        print(f"| {name} | {t:.1f} | {f:.1f} | {f / t:.2f}x | {pk} |")
    for n, standalone, engine in gemm_rows:
        print(f"\nSGEMM {n}: standalone matrixmultiply {standalone:.1f} GFLOP/s, in the engine {engine:.1f} GFLOP/s "
              f"({100 * engine / standalone:.0f}%)", end="")
    print(f"\nflatmin cnn-s gradient: 1 thread {one['median_ms']:.1f} ms, 2 threads {two['median_ms']:.1f} ms, "
          f"scaling {one['median_ms'] / two['median_ms']:.2f}x")


if __name__ == "__main__":
    main()
