#!/usr/bin/env python3
"""Estimates the norm of the gradient of the Hessian trace, ‖∇tr(∇²f)(x)‖, at a model state,
by central finite differences of flatmin's exact trace along random directions.

For a unit direction u drawn uniformly on the sphere of R^d, E[(uᵀ∇tr)²] = ‖∇tr‖²/d, so with
D_k = (tr(x + h u_k) − tr(x − h u_k)) / (2h) the estimate is d · mean(D_k²), with the standard
error of that mean. Each trace is `flatmin trace --method structural` (exact) on the same
images, so the only approximation is the finite difference (error O(h²)) and the sampling of
directions. This is the quantity behind the paper's drift estimate: a perturbed step of SA
lowers the trace by about η'(ρ²/2)‖P∇tr‖² (P: projection on the tangent space of the minima,
so the full norm is an upper bound), RS by about η'(ρ²/2d)‖P∇tr‖² (docs/escape.md).

Needs numpy and safetensors. Usage:
  python tools/trace_gradient.py --flatmin target/release/flatmin --run RUN \\
      [--weights W.safetensors] [--directions 16] [--step 1e-3] [--size 1000] [--seed 0]
The run folder's config.json gives the model, loss, data and data seed (the images are the
class-balanced subset of --size training images `flatmin trace --split train` takes, with their
true labels); the weights default to the run's model.safetensors. Prints one JSON object.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file


def trace_of(args, cfg, weights):
    seed = cfg.get("data_seed")
    seed = cfg.get("seed", 0) if seed is None else seed
    cmd = [args.flatmin, "trace", "--weights", weights, "--model", cfg["model"],
           "--loss", cfg.get("loss", "ce"), "--data", cfg["data"], "--seed", str(seed),
           "--method", "structural", "--split", "train", "--size", str(args.size),
           "--dtype", "f64", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"flatmin trace failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flatmin", default="target/release/flatmin")
    p.add_argument("--run", required=True)
    p.add_argument("--weights")
    p.add_argument("--directions", type=int, default=16)
    p.add_argument("--step", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    weights = args.weights or os.path.join(args.run, "model.safetensors")
    with open(os.path.join(args.run, "config.json")) as f:
        cfg = json.load(f)
    state = load_file(weights)
    base = trace_of(args, cfg, weights)
    trainable = set(base["layers"].keys()) if base.get("layers") else None
    names = [n for n in state if state[n].dtype.kind == "f" and "running_" not in n
             and not n.startswith(("optimizer/", "trainer/"))
             and (trainable is None or n in trainable)]
    d = sum(state[n].size for n in names)
    if d != base["num_params"]:
        sys.exit(f"{weights}: {d} float parameters found, flatmin counts {base['num_params']}")
    rng = np.random.default_rng(args.seed)
    derivs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.directions):
            u = {n: rng.standard_normal(state[n].shape) for n in names}
            norm = math.sqrt(sum(float((v * v).sum()) for v in u.values()))
            traces = []
            for sign in (1.0, -1.0):
                moved = dict(state)
                for n in names:
                    moved[n] = (state[n].astype(np.float64)
                                + sign * args.step * u[n] / norm).astype(state[n].dtype)
                path = os.path.join(tmp, f"w{k}{'p' if sign > 0 else 'm'}.safetensors")
                save_file(moved, path)
                traces.append(trace_of(args, cfg, path)["trace"])
            derivs.append((traces[0] - traces[1]) / (2 * args.step))
    sq = d * np.square(np.array(derivs))
    est = float(sq.mean())
    se = float(sq.std(ddof=1) / math.sqrt(len(sq))) if len(sq) > 1 else float("nan")
    print(json.dumps({
        "weights": weights, "loss_fn": base["loss_fn"], "images": base["samples"],
        "num_params": d, "trace": base["trace"], "normalized_trace": base["normalized_trace"],
        "loss": base.get("loss"), "directions": args.directions, "step": args.step,
        "grad_trace_norm_sq": est, "grad_trace_norm_sq_std_error": se,
        "grad_trace_norm": math.sqrt(est),
        "directional_derivatives": derivs,
    }))


if __name__ == "__main__":
    main()
