"""Side-by-side timing of flatmin and PyTorch on the same machine, in one run, as ratios.

PyTorch side: the anchor scripts (../shared/anchors/bench_torch.py: eager gradient, HVP by
double backward and torch.func, batched HVP by vmap), copied to a scratch folder and run
there. flatmin side: `flatmin bench ... --json` (release build). Same workloads: float32,
batch 128, CIFAR-shaped random inputs, PyTorch-default initialization, BatchNorm in train mode.

Also SGEMM against torch.mm on square sizes and on the mlp-s layers' own shapes, with flatmin's
fraction of the FMA peak it measures in-process (`flatmin bench gemm` reports it), and with
`--train-data DIR` the default training recipe end to end: `flatmin train` as a whole process
against `tools/torch_train_reference.py` (same recipe, seed 0) on the same CIFAR-10 folder.

Repetitions follow the anchor's own rule (`measure` in ../shared/anchors/common.py: enough calls
for about 3 s of timed work, 10 to 100 of them, fewer when one call takes over a second), so a
short workload is timed over as many calls on both sides; `--reps N` fixes the count instead.

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
import time

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


def anchor_reps(binary, threads, task, *args, target_s=3.0, min_reps=10, max_reps=100):
    """The repetitions the anchor's `measure` would pick for this workload: a 3-call probe
    estimates one call, then enough calls for `target_s` seconds, clamped to [min_reps,
    max_reps]; over a second per call, about 15 s of calls and at least 3."""
    est = flatmin(binary, threads, task, *args, "--reps", "3")["median_ms"] / 1e3
    if est > 1.0:
        min_reps = max(3, min(min_reps, int(15.0 / est)))
    return int(max(min_reps, min(max_reps, target_s / max(est, 1e-9))))


def train_rows(py, binary, threads, data):
    """The default training recipe on `data`, seed 0: whole-process wall seconds of `flatmin
    train` and of the PyTorch reference script, and the reference's own training-loop seconds
    (it times the loop alone; flatmin's figure includes loading, evaluation of the 10,000
    training and 2,000 test images after every epoch and the run folder's files). flatmin runs
    twice: as is, and with `--eval-every 10` (one evaluation, at the end, as the reference
    evaluates its test images once); the reference runs twice too: as is, and with
    `--eval-each-epoch` (the same per-epoch evaluation as flatmin's default recipe)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "tools", "torch_train_reference.py")
    def reference(*extra):
        t0 = time.perf_counter()
        out = subprocess.run([py, script, "--data", data, "--seeds", "0", "--threads", str(threads), *extra],
                             check=True, capture_output=True, text=True).stdout
        return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])
    torch_wall, ref = reference()
    same_work_wall, _ = reference("--eval-each-epoch")
    runs = {}
    for label, extra in [("default", []), ("end_eval", ["--eval-every", "10"])]:
        folder = tempfile.mkdtemp(prefix="flatmin-compare-train-")
        t0 = time.perf_counter()
        subprocess.run([binary, "train", "--data", data, "--out", os.path.join(folder, "run"), "--threads",
                        str(threads), "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        summary = json.load(open(os.path.join(folder, "run", "summary.json")))
        shutil.rmtree(folder, ignore_errors=True)
        runs[label] = (wall, summary["final"]["test_acc"])
    return {"torch_process_s": torch_wall, "torch_loop_s": ref["wall_s"], "torch_test_acc": ref["test_acc"],
            "torch_eval_each_epoch_process_s": same_work_wall,
            "flatmin_process_s": runs["default"][0], "flatmin_test_acc": runs["default"][1],
            "flatmin_end_eval_process_s": runs["end_eval"][0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchors", default="../shared/anchors")
    ap.add_argument("--flatmin", default="target/release/flatmin")
    ap.add_argument("--reps", type=int, help="fixed repetitions for every flatmin workload "
                    "(default: the anchor's rule, about 3 s of calls, 10 to 100)")
    ap.add_argument("--train-data", metavar="DIR", help="CIFAR-10 binary folder: also time the "
                    "default training recipe end to end against tools/torch_train_reference.py")
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
    def reps_for(task, *args, **rule):
        return str(a.reps or anchor_reps(a.flatmin, a.threads, task, *args, **rule))

    for m in MODELS:
        g = flatmin(a.flatmin, a.threads, "grad", "--model", m, "--reps", reps_for("grad", "--model", m))
        h = flatmin(a.flatmin, a.threads, "hvp", "--model", m, "--reps",
                    reps_for("hvp", "--model", m, max_reps=60, target_s=4.0 if m == "resnet20" else 3.0))
        tg = torch_ms("grad", m)
        rows.append((f"gradient, {m}", tg, g["median_ms"]))
        th = min(torch_ms("hvp", m, "double"), torch_ms("hvp", m, "func"))
        rows.append((f"HVP, {m} (torch: faster of double backward / torch.func)", th, h["median_ms"]))
        rows.append((f"HVP / gradient, {m}", th / tg, h["median_ms"] / h["grad_ms"]))
        rss = torch_rec("hvp", m, "double").get("maxrss_mb", float("nan"))
        mem.append((f"peak RSS of an HVP process, {m} (torch: double backward)", rss, h["maxrss_mb"]))
        if m != "resnet20":
            vecs = ("--model", m, "--vectors", "16")
            b = flatmin(a.flatmin, a.threads, "hvp-batched", *vecs, "--reps",
                        reps_for("hvp-batched", *vecs, max_reps=40, target_s=4.0))
            rows.append((f"batched HVP x16 per direction, {m} (torch: vmap)", torch_ms("bhvp", m, "func_vmap"), b["median_ms"] / 16))
    reps = a.reps or 20
    one = flatmin(a.flatmin, 1, "grad", "--model", "cnn-s", "--reps", str(reps))
    two = flatmin(a.flatmin, 2, "grad", "--model", "cnn-s", "--reps", str(reps))
    gemm = flatmin(a.flatmin, a.threads, "gemm", "--size", "1024", "--reps", str(reps))
    gemm_rows = []
    if a.mm_bench:
        env = dict(os.environ, MATMUL_NUM_THREADS=str(a.threads))
        out = subprocess.run([a.mm_bench, "512", "1024"], env=env, check=True, capture_output=True, text=True).stdout
        mm = {r["n"]: r for r in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}
        for n in [512, 1024]:
            g = flatmin(a.flatmin, a.threads, "gemm", "--size", str(n), "--reps", str(reps))
            gemm_rows.append((n, mm[n]["gflops_median"], g["gflops"]))
    gemms = gemm_table(sys.executable, a.flatmin, a.threads, max(10, reps))
    train = train_rows(sys.executable, a.flatmin, a.threads, a.train_data) if a.train_data else None
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
    if train:
        t = train
        print("\n| default training recipe (cnn-s, 10 epochs, seed 0) | PyTorch s | flatmin s | speedup |")
        print("| --- | --- | --- | --- |")
        print(f"| whole process | {t['torch_process_s']:.1f} | {t['flatmin_process_s']:.1f} | "
              f"{t['torch_process_s'] / t['flatmin_process_s']:.2f}x |")
        print(f"| whole process, both evaluating all training and test images after every epoch | "
              f"{t['torch_eval_each_epoch_process_s']:.1f} | {t['flatmin_process_s']:.1f} | "
              f"{t['torch_eval_each_epoch_process_s'] / t['flatmin_process_s']:.2f}x |")
        print(f"| PyTorch's training loop alone / flatmin's whole process | {t['torch_loop_s']:.1f} | "
              f"{t['flatmin_process_s']:.1f} | {t['torch_loop_s'] / t['flatmin_process_s']:.2f}x |")
        print(f"| PyTorch's training loop alone / flatmin's whole process with --eval-every 10 (one evaluation) | "
              f"{t['torch_loop_s']:.1f} | {t['flatmin_end_eval_process_s']:.1f} | "
              f"{t['torch_loop_s'] / t['flatmin_end_eval_process_s']:.2f}x |")
        print(f"| test accuracy | {100 * t['torch_test_acc']:.2f}% | {100 * t['flatmin_test_acc']:.2f}% | — |")
    print(f"\nflatmin cnn-s gradient: 1 thread {one['median_ms']:.1f} ms, 2 threads {two['median_ms']:.1f} ms, "
          f"scaling {one['median_ms'] / two['median_ms']:.2f}x")


if __name__ == "__main__":
    main()
