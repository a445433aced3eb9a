"""Reference trajectories of torch.optim.SGD and torch.optim.AdamW for optim/tests/pytorch.rs.

Run: /work/venv/bin/python tools/optim_reference.py   (any Python with torch)
Objective: f(p) = sum(0.5 * a * p**2 + b * p), a = [1, 2, 3], b = [0.1, -0.2, 0.3], float64.
"""
import torch

A = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
B = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)


def run(make, steps=5):
    p = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = make([p])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * A * p * p + B * p).sum().backward()
        opt.step()
    return p.detach().tolist()


cases = {
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
}
for name, make in cases.items():
    print(f"{name} = {[repr(v) for v in run(make)]}")
