"""Side-by-side timing of exact and estimated Hessian traces: flatmin against BackPACK's
DiagHessian, torch.func (vmap over basis HVPs) and PyHessian-style Hutchinson in PyTorch, in
one run on one machine, as ratios.

PyTorch side: ../shared/anchors/bench_trace.py (copied to a scratch folder and run there);
it needs `pip install backpack-for-pytorch` in the same environment as torch. flatmin side:
`flatmin bench trace ... --json` (release build). Same workloads: float32, tiny-tanh at batch
256, mlp-s and cnn-s at batch 128, CIFAR-shaped random inputs, PyTorch-default
initialization (each side its own draw of weights and inputs: compare times, not traces).

Run from the workspace root after `cargo build --release`:
    /path/to/venv/bin/python benches/compare/compare_trace.py [--threads 2]
Prints a Markdown table: medians and speedup = PyTorch time / flatmin time (> 1: flatmin
faster).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def torch_runs(py, anchors, threads, out, probes):
    scratch = tempfile.mkdtemp(prefix="flatmin-compare-trace-")
    for f in ["bench_trace.py", "common.py"]:
        shutil.copy(os.path.join(anchors, f), scratch)
    env = dict(os.environ, ANCHOR_OUT=out)
    run = lambda *a: subprocess.run([py, "bench_trace.py", "--threads", str(threads), *a], cwd=scratch, env=env,
                                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for m in ["tiny_tanh", "mlp_s", "cnn_s"]:
        run("--task", "backpack", "--model", m)
    run("--task", "exact", "--reps", "1")
    run("--task", "hutchinson", "--model", "cnn_s", "--probes", str(probes))
    shutil.rmtree(scratch, ignore_errors=True)


def flatmin(binary, threads, *args):
    out = subprocess.run([binary, "bench", "trace", *args, "--threads", str(threads), "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", default="../shared/anchors")
    ap.add_argument("--flatmin", default="target/release/flatmin")
    ap.add_argument("--probes", type=int, default=100)
    a = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    torch_runs(sys.executable, a.anchors, a.threads, out, a.probes)
    recs = [json.loads(l) for l in open(out)]
    os.unlink(out)

    def rec(suite, model, method=None):
        for r in recs:
            if r.get("suite") == suite and r.get("model") == model and (method is None or r.get("method") == method):
                return r
        return {}

    rows = []
    for model, batch, key in [("tiny-tanh", 256, "tiny_tanh"), ("mlp-s", 128, "mlp_s"), ("cnn-s", 128, "cnn_s")]:
        f = flatmin(a.flatmin, a.threads, "--model", model, "--batch", str(batch), "--reps", "10" if model != "cnn-s" else "5")
        b = rec("backpack", key)
        t = b.get("median_ms", float("nan"))
        rows.append((f"exact trace, {model} batch {batch}: BackPACK DiagHessian vs flatmin structural", t, f["median_ms"]))
    f = flatmin(a.flatmin, a.threads, "--model", "tiny-tanh", "--batch", "256", "--method", "basis", "--vectors", "64", "--reps", "3")
    e = rec("trace_exact", "tiny_tanh")
    rows.append(("exact trace, tiny-tanh batch 256: torch.func vmap over 6,506 HVPs vs flatmin basis HVPs",
                 e.get("total_s", float("nan")) * 1e3, f["median_ms"]))
    f = flatmin(a.flatmin, a.threads, "--model", "cnn-s", "--batch", "128", "--method", "hutchinson",
                "--probes", str(a.probes), "--vectors", "16", "--reps", "1")
    h = rec("hutchinson", "cnn_s")
    rows.append((f"Hutchinson, cnn-s batch 128, per probe ({a.probes} probes): PyTorch double backward (graph reused) vs flatmin",
                 h.get("per_probe_ms", float("nan")), f["per_probe_ms"]))
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | head -1"], capture_output=True, text=True).stdout.strip()
    torch_version = next((r.get("torch_version") for r in recs if r.get("torch_version")), "?")
    bp_version = next((r.get("backpack_version") for r in recs if r.get("backpack_version")), "?")
    print(f"machine: {cpu}, {a.threads} threads; torch {torch_version}; backpack {bp_version}\n")
    print("| workload (float32) | PyTorch ms | flatmin ms | speedup |")
    print("| --- | --- | --- | --- |")
    for name, t, f in rows:
        print(f"| {name} | {t:.1f} | {f:.1f} | {t / f:.2f}x |")


if __name__ == "__main__":
    main()
