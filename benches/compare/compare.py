"""Side-by-side timing of flatmin and PyTorch on the same machine, in one run, as ratios.

PyTorch side: the anchor scripts (../shared/anchors/bench_torch.py: eager gradient, HVP by
double backward and torch.func, batched HVP by vmap), copied to a scratch folder and run
there. flatmin side: `flatmin bench ... --json` (release build). Same workloads: float32,
batch 128, CIFAR-shaped random inputs, PyTorch-default initialization, BatchNorm in train mode.

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


def flatmin(binary, threads, *args):
    out = subprocess.run([binary, "bench", *args, "--threads", str(threads), "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", default="../shared/anchors")
    ap.add_argument("--flatmin", default="target/release/flatmin")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    torch_runs(sys.executable, a.anchors, a.threads, out)
    recs = [json.loads(l) for l in open(out)]
    os.unlink(out)

    def torch_ms(suite, model, method=None):
        for r in recs:
            if r.get("suite") == suite and r.get("model") == MODELS[model] and (method is None or r.get("method") == method):
                return r["median_ms"] if suite != "bhvp" else r["per_vector_ms"]
        return float("nan")

    rows = []
    for m in MODELS:
        reps = str(a.reps if m != "resnet20" else max(3, a.reps // 3))
        g = flatmin(a.flatmin, a.threads, "grad", "--model", m, "--reps", reps)
        h = flatmin(a.flatmin, a.threads, "hvp", "--model", m, "--reps", reps)
        tg = torch_ms("grad", m)
        rows.append((f"gradient, {m}", tg, g["median_ms"]))
        th = min(torch_ms("hvp", m, "double"), torch_ms("hvp", m, "func"))
        rows.append((f"HVP, {m} (torch: faster of double backward / torch.func)", th, h["median_ms"]))
        rows.append((f"HVP / gradient, {m}", th / tg, h["median_ms"] / h["grad_ms"]))
        if m != "resnet20":
            b = flatmin(a.flatmin, a.threads, "hvp-batched", "--model", m, "--vectors", "16", "--reps", str(max(3, a.reps // 2)))
            rows.append((f"batched HVP x16 per direction, {m} (torch: vmap)", torch_ms("bhvp", m, "func_vmap"), b["median_ms"] / 16))
    gemm = flatmin(a.flatmin, a.threads, "gemm", "--size", "1024", "--reps", str(a.reps))
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


if __name__ == "__main__":
    main()
