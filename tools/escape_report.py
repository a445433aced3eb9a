#!/usr/bin/env python3
"""Figures and the verdict tables of docs/escape.md from the runs of tools/escape_experiment.sh.

Usage: python tools/escape_report.py RUNS_DIR [FIGURES_DIR] [--experiment mlp|cnn]
Reads RUNS_DIR/{good,bad,<arm>-s<seed>}/metrics.jsonl; writes PREFIX-trace.png,
PREFIX-trace-vs-loss.png and PREFIX-test-acc.png into FIGURES_DIR (default docs/), and
PREFIX-runs.json there: every run's logged trace and evaluation series and the SHA-256 of its
model.safetensors (a rerun of tools/escape_experiment.sh with the same flatmin on the same kind
of CPU gives the same bits); prints a Markdown table per arm (mean ± std over seeds) and, for
the cnn experiment, each arm's trace against plain descent at equal training loss. PREFIX is `escape` for the mlp
experiment (RUNS_DIR = the script's OUT_DIR) and `escape-cnn` for the cnn one (RUNS_DIR =
OUT_DIR/cnn). Needs matplotlib (figures) and numpy.
"""

import hashlib
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

# Arms of the mlp experiment in the order of the figures, with their labels.
MLP_ARMS = [
    ("gd", "GD (no perturbation)"),
    ("sa-b1", "SA, B = 1"),
    ("sa-b16", "SA, B = 16"),
    ("sa-b64", "SA, B = 64"),
    ("sa-full", "SA, B = 1000 (full)"),
    ("rs", "RS, η' = 0.02"),
    ("rs-eq", "RS, η' = 5e-4 (SA's)"),
    ("sa-rho0", "control: SA, ρ = 1e-4"),
    ("sa-noproj", "control: SA, no projection"),
    ("label-noise", "control: label-noise GD"),
]

# Arms of the cnn-s check (cross-entropy, minibatch SGD at rate 0.02 plus the perturbation).
CNN_ARMS = [
    ("sgd", "SGD (no perturbation)"),
    ("sa-b1", "SA, B = 1, ρ = 0.05"),
    ("rs", "RS, ρ = 3, η' = 0.02"),
    ("sa-rho0", "control: SA, ρ = 1e-4"),
]

# Per experiment: its arms, the arm the others are compared with, the figure prefix, the loss.
EXPERIMENTS = {
    "mlp": {"arms": MLP_ARMS, "reference": "gd", "prefix": "escape", "loss": "MSE", "zoom": False},
    "cnn": {"arms": CNN_ARMS, "reference": "sgd", "prefix": "escape-cnn", "loss": "cross-entropy",
            "zoom": True},
}


def records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(run, start=None):
    """The run's exact traces and evaluations by step; `start` (the starting minimum's series)
    supplies step 0's evaluation, which a run does not log itself."""
    tr, ev = {}, {}
    for r in records(run):
        if r["kind"] == "trace":
            tr[r["step"]] = r["extra"]["trace"]
        elif r["kind"] == "eval":
            ev[r["step"]] = (r["train_loss"], r["train_acc"], r["test_acc"])
    if start is not None:
        ev.setdefault(0, (start["train_loss"][-1], start["train_acc"][-1], start["test_acc"][-1]))
    steps = sorted(set(tr) & set(ev))
    return {
        "step": np.array(steps, dtype=float),
        "trace": np.array([tr[s] for s in steps]),
        "train_loss": np.array([ev[s][0] for s in steps]),
        "train_acc": np.array([ev[s][1] for s in steps]),
        "test_acc": np.array([ev[s][2] for s in steps]),
        "finished": os.path.exists(os.path.join(run, "summary.json")),
    }


def collect(root, start):
    """Finished runs `<arm>-s<seed>` by arm (unfinished ones are reported and left out)."""
    arms = defaultdict(list)
    for name in sorted(os.listdir(root)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        if m and os.path.exists(os.path.join(root, name, "metrics.jsonl")):
            run = series(os.path.join(root, name), start)
            if run["finished"]:
                arms[m.group(1)].append(run)
            else:
                print(f"left out (not finished): {name}", file=sys.stderr)
    return arms


def stacked(runs, key):
    n = min(len(r[key]) for r in runs)
    return runs[0]["step"][:n], np.stack([r[key][:n] for r in runs])


def fmt(values, scale=1.0, digits=1):
    """mean ± sample standard deviation over runs (the value alone for one run)."""
    v = np.asarray(values) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def table(arms, start, exp):
    print(f"bad minimum: trace {start['trace'][-1]:.1f}, train loss {start['train_loss'][-1]:.2e}, "
          f"train acc {100 * start['train_acc'][-1]:.1f}%, test acc {100 * start['test_acc'][-1]:.1f}%")
    print()
    # The fit that built the bad minimum, as trace against training loss: the trace a plain
    # descent has at a given loss (interpolated in log loss; None outside its range).
    order = np.argsort(start["train_loss"])
    path_loss, path_trace = np.log(start["train_loss"][order]), start["trace"][order]

    def on_path(loss):
        x = np.log(loss)
        return np.interp(x, path_loss, path_trace) if path_loss[0] <= x <= path_loss[-1] else None

    print("| arm | runs | steps | trace at the end | trace change | train loss (end) "
          "| fit path's trace at that loss | min train acc | test acc (end) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, label in exp["arms"]:
        runs = arms.get(key)
        if not runs:
            continue
        steps, tr = stacked(runs, "trace")
        _, loss = stacked(runs, "train_loss")
        _, tra = stacked(runs, "train_acc")
        _, te = stacked(runs, "test_acc")
        change = 100 * (tr[:, -1] / tr[:, 0] - 1)
        path = [on_path(v) for v in loss[:, -1]]
        path = fmt(path) if all(p is not None for p in path) else "outside the path"
        print(f"| {label} | {len(runs)} | {int(steps[-1])} | {fmt(tr[:, -1])} | {fmt(change)}% "
              f"| {fmt(loss[:, -1], 1e4, 2)}e-4 | {path} | {fmt(tra.min(axis=1), 100)}% "
              f"| {fmt(te[:, -1], 100)}% |")


def at_loss(run, loss):
    """The run's trace where its training loss was `loss` (interpolated in log loss over its
    records sorted by loss; None more than 1% outside the range it covered)."""
    order = np.argsort(run["train_loss"])
    x, y = np.log(run["train_loss"][order]), run["trace"][order]
    v = np.log(loss)
    return float(np.interp(v, x, y)) if x[0] - 0.01 <= v <= x[-1] + 0.01 else None


def equal_loss_table(arms, exp, fit):
    """Each arm against plain descent at equal training loss: every logged point of a run
    (after the start) is compared with the reference runs' mean trace where their training
    loss was the same or, above the start's loss, with the fit that built the bad minimum
    (`fit`); points outside both are left out."""
    refs = arms.get(exp["reference"])
    if not refs:
        return
    ref_label = dict(exp["arms"])[exp["reference"]]

    def descent_at(loss):
        vals = [at_loss(r, loss) for r in refs]
        if all(v is not None for v in vals):
            return float(np.mean(vals)), "ref"
        v = at_loss(fit, loss)
        return (v, "fit") if v is not None else (None, None)

    print(f"| arm | runs | train loss (end) | trace (end) | plain descent at that loss | ratio at the end "
          f"| ratio over the run (mean of its points) | points vs {ref_label} / vs the fit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, label in exp["arms"]:
        runs = arms.get(key)
        if not runs or key == exp["reference"]:
            continue
        end_ratio, mean_ratio, ref_end, used = [], [], [], {"ref": 0, "fit": 0}
        for r in runs:
            ratios = []
            for t, loss in zip(r["trace"][1:], r["train_loss"][1:]):
                q, which = descent_at(loss)
                if q is not None:
                    ratios.append(t / q)
                    used[which] += 1
            if ratios:
                mean_ratio.append(np.mean(ratios))
            q, _ = descent_at(r["train_loss"][-1])
            if q is not None:
                end_ratio.append(r["trace"][-1] / q)
                ref_end.append(q)
        loss = [r["train_loss"][-1] for r in runs]
        trace = [r["trace"][-1] for r in runs]
        end = fmt(end_ratio, digits=3) if len(end_ratio) == len(runs) else "outside"
        over = fmt(mean_ratio, digits=3) if mean_ratio else "outside"
        print(f"| {label} | {len(runs)} | {fmt(loss, 1e4, 2)}e-4 | {fmt(trace)} "
              f"| {fmt(ref_end) if ref_end else '–'} | {end} | {over} | {used['ref']} / {used['fit']} |")


def band(ax, x, ys, label, **kw):
    mean = ys.mean(axis=0)
    line, = ax.plot(x, mean, label=f"{label} ({len(ys)})", lw=1.6, **kw)
    if len(ys) > 1:
        sd = ys.std(axis=0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.18, lw=0)


def figures(arms, good, bad, out, exp):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    styles = {"sa-rho0": "--", "sa-noproj": "--", "label-noise": "--"}
    specs = [
        ("trace", "step", "trace", "steps from the bad minimum", "exact Hessian trace tr(H)"),
        ("trace-vs-loss", "train_loss", "trace", f"training loss (evaluation, {exp['loss']})",
         "exact Hessian trace tr(H)"),
        ("test-acc", "step", "test_acc", "steps from the bad minimum", "test accuracy"),
    ]
    keys = [k for k, _ in exp["arms"]]
    for name, xkey, ykey, xlabel, ylabel in specs:
        fname = f"{exp['prefix']}-{name}.png"
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        for key, label in exp["arms"]:
            runs = arms.get(key)
            if not runs:
                continue
            _, ys = stacked(runs, ykey)
            if xkey == "step":
                x = runs[0]["step"][: ys.shape[1]]
                band(ax, x, ys, label, ls=styles.get(key, "-"))
            else:
                for i, r in enumerate(runs):
                    ax.plot(r[xkey], r[ykey], ls=styles.get(key, "-"), lw=1.0,
                            color=f"C{keys.index(key)}",
                            label=f"{label}" if i == 0 else None, marker=".", ms=3)
        if xkey == "train_loss":
            # The paths that built the two minima: the trace of a fit along its own descent.
            for ref, label, ls in ((bad, "fit to the bad minimum", "-."), (good, "fit to the good minimum", ":")):
                if ref is not None:
                    ax.plot(ref["train_loss"], ref["trace"], color="0.45", ls=ls, lw=1.0, label=label)
        if xkey == "step" and ykey == "trace" and good is not None:
            ax.axhline(good["trace"][-1], color="k", lw=0.8, ls=":", label="good minimum")
        if ykey == "test_acc" and good is not None:
            ax.axhline(good["test_acc"][-1], color="k", lw=0.8, ls=":", label="good minimum")
        if xkey == "train_loss":
            ax.set_xscale("log")
            if exp["zoom"]:
                # The escape runs' region only (the fits start at losses 100x higher).
                pts = [(l, t) for key, _ in exp["arms"] for r in arms.get(key, [])
                       for l, t in zip(r["train_loss"], r["trace"])]
                lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
                ax.set_xlim(lo / 1.5, hi * 1.5)
                ax.set_ylim(0, 1.2 * max(p[1] for p in pts))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname))
        plt.close(fig)
        print(f"wrote {os.path.join(out, fname)}")


def dump(root, out, prefix):
    """PREFIX-runs.json: each run's series and the SHA-256 of its final weights."""
    runs = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        weights = os.path.join(path, "model.safetensors")
        if not (os.path.isfile(os.path.join(path, "summary.json")) and os.path.isfile(weights)):
            continue
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        r = series(path)
        runs[name] = {
            "model_sha256": digest,
            "optimizer": cfg["optimizer"], "seed": cfg["seed"], "rho": cfg["rho"],
            "eta_prime": cfg.get("eta_prime"), "probe_batch": cfg["probe_batch"],
            "project": cfg["project"], "lr": cfg["lr"], "label_noise": cfg["label_noise"],
            **{k: [float(x) for x in r[k]] for k in ("step", "trace", "train_loss", "train_acc", "test_acc")},
        }
    path = os.path.join(out, f"{prefix}-runs.json")
    with open(path, "w") as f:
        json.dump(runs, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({len(runs)} runs)")


def main():
    args = sys.argv[1:]
    name = "mlp"
    if "--experiment" in args:
        i = args.index("--experiment")
        if i + 1 >= len(args) or args[i + 1] not in EXPERIMENTS:
            sys.exit(f"--experiment takes one of {', '.join(EXPERIMENTS)}")
        name = args[i + 1]
        del args[i : i + 2]
    if not args:
        sys.exit(__doc__)
    exp = EXPERIMENTS[name]
    root = args[0]
    out = args[1] if len(args) > 1 else "docs"
    good = series(os.path.join(root, "good")) if os.path.isdir(os.path.join(root, "good")) else None
    bad = series(os.path.join(root, "bad"))
    arms = collect(root, bad)
    if good is not None:
        print(f"good minimum: trace {good['trace'][-1]:.1f}, train loss {good['train_loss'][-1]:.2e}, "
              f"train acc {100 * good['train_acc'][-1]:.1f}%, test acc {100 * good['test_acc'][-1]:.1f}%")
    table(arms, bad, exp)
    if name == "cnn":
        print()
        equal_loss_table(arms, exp, bad)
    figures(arms, good, bad, out, exp)
    dump(root, out, exp["prefix"])


if __name__ == "__main__":
    main()
