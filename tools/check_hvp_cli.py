"""End-to-end check of `flatmin hvp` against PyTorch with inputs that are not in the repo.

For each preset and BatchNorm mode: PyTorch-default weights (torch.manual_seed), a few real
CIFAR-10 records, a random direction; PyTorch (float64, double backward) computes logits, loss,
gradients and HVPs; the flatmin binary computes the same from the files; the script prints the
errors with the contract's metrics:
  f64: max |flatmin - torch| / max |torch| per tensor (bound 1e-8),
  f32: max |flatmin - torch| / largest |torch| among all tensors of its kind (bound 2e-3).

Run (from the workspace root, after `cargo build --release`):
    /path/to/venv/bin/python tools/check_hvp_cli.py --data ../shared/data/cifar10-subset/test_batch.bin
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import MLP, CNN, ResNet  # noqa: E402  (the reference definitions)

PRESETS = {
    "tiny-tanh": lambda: MLP([192, 32, 10], "tanh", input_pool=4),
    "mlp-s": lambda: MLP([3072, 256, 256, 10], "relu"),
    "cnn-s": CNN,
    "resnet20": lambda: ResNet([3, 3, 3], [16, 32, 64]),
}
MEAN = torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64).view(1, 3, 1, 1)


def write_records(data, start, count, folder):
    """Copies CIFAR-10 records [start, start + count) of the batch file `data` into
    folder/batch.bin; returns that path, the normalized float64 images and the labels."""
    raw = np.fromfile(data, dtype=np.uint8).reshape(-1, 3073)[start:start + count]
    batch = os.path.join(folder, "batch.bin")
    raw.tofile(batch)
    x = (torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float64)) / 255 - MEAN) / STD
    y = torch.from_numpy(raw[:, 0].astype(np.int64))
    return batch, x, y


def torch_reference(model, x, y, v, bn_mode):
    model = model.double()
    model.train(bn_mode == "train")
    params = [p for p in model.parameters()]
    if bn_mode == "train":  # batch statistics without touching the running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
    hv = torch.autograd.grad(gv, params)
    return logits.detach(), loss.detach(), [t.detach() for t in g], [t.detach() for t in hv]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a CIFAR-10 batch file to take records from")
    ap.add_argument("--records", type=int, default=6)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--flatmin", default="target/release/flatmin")
    a = ap.parse_args()
    worst_ok = True
    with tempfile.TemporaryDirectory() as d:
        batch, x, y = write_records(a.data, 100, a.records, d)
        for name, make in PRESETS.items():
            torch.manual_seed(a.seed)
            model = make()
            if name == "resnet20":  # move the running statistics away from 0/1
                model.train()
                with torch.no_grad():
                    model(torch.randn(16, 3, 32, 32))
            weights = os.path.join(d, "w.safetensors")
            save_file({k: t.contiguous() for k, t in model.state_dict().items()}, weights)
            pnames = [n for n, _ in model.named_parameters()]
            g = torch.Generator().manual_seed(a.seed + 1)
            v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
            vec = os.path.join(d, "v.safetensors")
            save_file(dict(zip(pnames, [t.float() for t in v])), vec)
            v = [t.float().double() for t in v]  # what flatmin reads
            for bn in (["train", "eval"] if name == "resnet20" else ["eval"]):
                ref_model = make()
                ref_model.load_state_dict(load_file(weights))
                logits, loss, gr, hv = torch_reference(ref_model, x, y, v, bn)
                for dtype in ["f64", "f32"]:
                    out = os.path.join(d, "out.safetensors")
                    subprocess.run([a.flatmin, "hvp", "--model", name, "--weights", weights, "--data", batch,
                                    "--vector", vec, "--dtype", dtype, "--bn-mode", bn, "--out", out], check=True)
                    got = {k: t.double() for k, t in load_file(out).items()}
                    kinds = {"logits": [("logits", logits)], "loss": [("loss", loss)],
                             "grad": [(f"grad.{n}", t) for n, t in zip(pnames, gr)],
                             "hvp": [(f"hvp.{n}", t) for n, t in zip(pnames, hv)]}
                    report = []
                    for kind, items in kinds.items():
                        if dtype == "f64":
                            err = max(((got[k] - t.reshape(got[k].shape)).abs().max() / t.abs().max().clamp_min(1e-300)).item()
                                      for k, t in items)
                            ok = err <= 1e-8
                        else:
                            scale = max(t.abs().max().item() for _, t in items)
                            err = max((got[k] - t.reshape(got[k].shape)).abs().max().item() for k, t in items) / scale
                            ok = err <= 2e-3
                        worst_ok &= ok
                        report.append(f"{kind} {err:.1e}{'' if ok else ' FAIL'}")
                    print(f"{name:9s} bn={bn:5s} {dtype}: " + ", ".join(report), flush=True)
    print("all within the contract" if worst_ok else "SOME ERRORS EXCEED THE CONTRACT")
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
