"""Train a small CNN in PyTorch, then measure its exact Hessian trace with flatmin, and compare
with BackPACK's exact Hessian diagonal when BackPACK is installed.

    pip install ./python torch            # BackPACK optional: pip install backpack-for-pytorch
    python python/examples/torch_trace.py

The data is a synthetic, learnable 10-class problem with CIFAR-10 shapes (so the example runs
anywhere); put your own normalized images and labels in `x`, `y`. The CNN uses ReLU and max
pooling: with a smooth activation (tanh, GELU) BackPACK's exact diagonal needs a dense
[N, V, V] tensor per layer (tens of GiB here), while flatmin's structural trace handles it.
"""

import time

import numpy as np
import torch
import torch.nn as nn

import flatmin

torch.manual_seed(0)
n = 512
x = torch.randn(n, 3, 32, 32)
teacher = torch.randn(3 * 32 * 32, 10)
y = (x.flatten(1) @ teacher).argmax(1)

model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
    nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(60):
    idx = torch.randint(0, n, (64,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"trained: loss {loss.item():.4f} on the last batch")

# The network and its trained weights, measured on 256 images in float64.
net = flatmin.Net.from_torch(model)
xm, ym = x[:256], y[:256]
t0 = time.perf_counter()
r = net.trace(xm, ym, method="exact", dtype="f64", per_layer=True)
t_flatmin = time.perf_counter() - t0
print(f"flatmin: trace {r['trace']:.10e} ({r['method']}, {r['num_params']} parameters) in {t_flatmin:.3f} s")
for name, layer in r["layers"].items():
    print(f"  {name:<12} {layer['trace']:.6e}")
top = net.eigenvalues(xm, ym, k=1, steps=60)
print(f"flatmin: top eigenvalue {top['eigenvalues'][0]:.6e} (residual {top['residuals'][0]:.1e})")

try:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian
except ImportError:
    print("BackPACK is not installed (pip install backpack-for-pytorch): comparison skipped")
else:
    m64 = extend(model.double())
    lossf = extend(nn.CrossEntropyLoss())
    t0 = time.perf_counter()
    loss = lossf(m64(xm.double()), ym)
    with backpack(DiagHessian()):
        loss.backward()
    bp = sum(p.diag_h.sum().item() for p in m64.parameters())
    t_backpack = time.perf_counter() - t0
    rel = abs(bp - r["trace"]) / abs(bp)
    print(f"BackPACK: trace {bp:.10e} in {t_backpack:.3f} s; relative difference {rel:.1e}")
    assert rel < 1e-8, "flatmin and BackPACK disagree"
