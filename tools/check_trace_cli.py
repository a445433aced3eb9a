"""End-to-end check of `flatmin trace --method exact` against PyTorch with inputs that are not in
the repo: PyTorch-default weights (torch.manual_seed), real CIFAR-10 records, float64.

References, computed here in PyTorch:
  tiny-tanh  the trace of the full Hessian (torch.autograd.functional.hessian)
  cnn-s      BackPACK's DiagHessian (the exact diagonal; needs backpack-for-pytorch), total and
             per tensor
  resnet20   BatchNorm in eval mode with moved running statistics (BackPACK cannot): exact
             per-tensor traces by basis HVPs (torch.func: jvp of grad, vmapped over unit
             vectors) for the tensors named by --resnet-tensors, and for the whole trace a
             Rademacher Hutchinson estimate with --probes probes, reported as a z-score
flatmin: `flatmin trace --method exact --per-layer --dtype f64 --json` on the same files.
Prints relative errors (bound 1e-9) and exits non-zero when one exceeds it.

Run (from the workspace root, after `cargo build --release`):
    /path/to/venv/bin/python tools/check_trace_cli.py --data ../shared/data/cifar10-subset/test_batch.bin
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from check_hvp_cli import PRESETS, write_records  # noqa: E402  (the reference definitions)


def flatmin_trace(binary, name, weights, batch):
    out = subprocess.run([binary, "trace", "--model", name, "--weights", weights, "--data", batch,
                          "--dtype", "f64", "--method", "exact", "--per-layer", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def loss_fn(model, x, y):
    from torch.func import functional_call

    def f(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)
    return f


def full_hessian_trace(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            params[n] = theta[i:i + k].view(s)
            i += k
        return loss_fn(model, x, y)(params)
    h = torch.autograd.functional.hessian(f, flat, vectorize=True)
    return float(torch.diagonal(h).sum())


def backpack_diag(model_ref, name, x, y):
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian
    assert name == "cnn-s"
    seq = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)).double()
    with torch.no_grad():
        for p, q in zip(seq.parameters(), model_ref.parameters()):
            p.copy_(q)
        assert torch.equal(seq(x), model_ref(x))
    seq = extend(seq)
    loss = extend(nn.CrossEntropyLoss())(seq(x), y)
    with backpack(DiagHessian()):
        loss.backward()
    names = [n for n, _ in model_ref.named_parameters()]
    return {n: float(p.diag_h.sum()) for n, p in zip(names, seq.parameters())}


def basis_traces(model, x, y, tensors):
    from torch.func import grad, jvp, vmap
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = grad(loss_fn(model, x, y))
    out = {}
    for key in tensors:
        n = params[key].numel()

        def hv(ev, key=key):
            v = {k: torch.zeros_like(t) for k, t in params.items()}
            v[key] = ev.view(params[key].shape)
            return jvp(g, (params,), (v,))[1][key].reshape(-1)
        total = 0.0
        for s in range(0, n, 16):  # 16 directions per vmap: memory grows with the count
            e = min(n, s + 16)
            eye = torch.zeros(e - s, n, dtype=torch.float64)
            eye[torch.arange(e - s), torch.arange(s, e)] = 1
            total += float(vmap(hv)(eye)[torch.arange(e - s), torch.arange(s, e)].sum())
        out[key] = total
    return out


def hutchinson(model, x, y, probes, seed):
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    loss = F.cross_entropy(model(x), y)
    gr = torch.autograd.grad(loss, params, create_graph=True)
    vals = []
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=gen).double().mul_(2).sub_(1) for p in params]
        hv = torch.autograd.grad(gr, params, grad_outputs=v, retain_graph=True)
        vals.append(float(sum((h * u).sum() for h, u in zip(hv, v))))
    vals = np.array(vals)
    return vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a CIFAR-10 batch file to take records from")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--seed", type=int, default=321)
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--resnet-tensors", default="bn1.weight,layer1.0.bn1.bias,layer2.0.shortcut.1.bias,"
                    "layer3.2.bn2.weight,linear.bias")
    ap.add_argument("--flatmin", default="target/release/flatmin")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        batch, x, y = write_records(a.data, 200, a.records, d)
        for name in ["tiny-tanh", "cnn-s", "resnet20"]:
            torch.manual_seed(a.seed)
            model = PRESETS[name]()
            if name == "resnet20":  # move the running statistics away from 0/1
                model.train()
                with torch.no_grad():
                    model(torch.randn(16, 3, 32, 32))
            weights = os.path.join(d, "w.safetensors")
            save_file({k: t.contiguous() for k, t in model.state_dict().items()}, weights)
            model = model.double().eval()
            got = flatmin_trace(a.flatmin, name, weights, batch)
            layers = got["layers"]
            print(f"{name}: flatmin {got['method']} trace {got['trace']:.12e} in {got['seconds']:.2f} s", flush=True)
            if name == "tiny-tanh":
                want = full_hessian_trace(model, x, y)
                e = rel(got["trace"], want)
                ok &= e <= 1e-9
                print(f"  full Hessian (torch.autograd.functional.hessian) {want:.12e}: relative error {e:.1e}")
            elif name == "cnn-s":
                want = backpack_diag(model, name, x, y)
                total = sum(want.values())
                e = rel(got["trace"], total)
                ok &= e <= 1e-9
                print(f"  BackPACK DiagHessian {total:.12e}: relative error {e:.1e}")
                for k, t in want.items():
                    e = rel(layers[k]["trace"], t)
                    ok &= e <= 1e-9
                    print(f"    {k}: {e:.1e}")
            else:
                want = basis_traces(model, x, y, a.resnet_tensors.split(","))
                for k, t in want.items():
                    e = rel(layers[k]["trace"], t)
                    ok &= e <= 1e-9
                    print(f"  {k}: torch basis HVPs {t:.12e}, relative error {e:.1e}")
                mean, se = hutchinson(model, x, y, a.probes, a.seed)
                z = (got["trace"] - mean) / se
                ok &= abs(z) < 4
                print(f"  whole trace: torch Hutchinson ({a.probes} probes) {mean:.6e} ± {se:.2e}: z = {z:.2f}")
    print("all checks pass" if ok else "SOME CHECKS FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
