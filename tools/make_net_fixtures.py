"""Golden fixtures for network files: three small non-preset networks, exported with
tools/export_torch.py, and their PyTorch float64 references (logits, loss, gradients, HVPs in
BatchNorm train and eval mode, the exact Hessian trace in eval mode).

Regenerate (from the repository root, with the project's Python environment: torch, numpy,
safetensors):

    /work/venv/bin/python tools/make_net_fixtures.py            # rewrites the folders below
    /work/venv/bin/python tools/make_net_fixtures.py --check    # regenerates into a temporary
                                                                # folder; exit 1 unless every
                                                                # committed file is identical

The script runs PyTorch on one thread (torch.set_num_threads(1)) from fixed seeds, so rerunning
it reproduces every file bit for bit (with the same torch build). It takes about two minutes
(most of it the exact traces, one double backward per parameter element).

Layout: models/tests/fixtures/nets/<case>/ for each case in

    vgg_bn        VGG-style CNN with BatchNorm: nested `features` / `classifier` Sequentials
                  (names `features.0`, `classifier.3`, ...), MaxPool2d, AvgPool2d,
                  x.view(x.size(0), -1), an Identity (dropout switched off); seed 1
    gelu_mlp      AvgPool2d(4) -> Flatten -> Linear(192, 32) -> GELU -> Linear(32, 32) -> Tanh
                  -> Linear(32, 10), one nn.Sequential (layers `0` ... `6`, parameters
                  `2.weight`, `2.bias`, `4.*`, `6.*`); no BatchNorm; seed 2
    small_resnet  conv-BN-ReLU stem, two fx-traced BasicBlocks (8 -> 16 with stride 2 and a
                  1x1-conv + BN projection shortcut; 16 -> 16 with an identity shortcut, an empty
                  nn.Sequential, so the Add reads the block's input directly), F.relu,
                  AdaptiveAvgPool2d(1), torch.flatten(x, 1), Linear(16, 10); seed 3

with three files each:

  network.json        export_torch.export(module, path, input_shape=(3, 32, 32)) of the module.
  weights.safetensors safetensors.torch.save_file(module.state_dict()) of the float64 module
                      (module.double()): keys and order of the state_dict, float64 tensors,
                      BatchNorm num_batches_tracked int64. BatchNorm state is non-trivial:
                      weight uniform(0.5, 1.5), bias uniform(-0.2, 0.2), then two train-mode
                      forwards of 8 standard-normal images each, so running_mean/running_var
                      moved and num_batches_tracked = 2. Every other tensor is PyTorch's default
                      initialization under the case's seed.
  case.safetensors    the batch, the directions and the references (float64 unless said):
                        x                       [8, 3, 32, 32] standard normal
                        y                       int64 [8], labels in 0..9
                        v.NAME                  the HVP direction for trainable parameter NAME
                                                (its shape), uniform(-1, 1)
                      and for each BatchNorm mode M in `train`, `eval` (gelu_mlp has no
                      BatchNorm: both are stored and coincide):
                        M.logits                [8, 10]
                        M.loss                  [1] mean softmax cross-entropy of M.logits
                        M.grad.NAME             d loss / d NAME (NAME's shape)
                        M.hvp.NAME              (H v) restricted to NAME, H the Hessian of the
                                                mean loss w.r.t. all trainable parameters, by
                                                double backward
                      In `train` mode BatchNorm normalizes with the batch statistics (a copy of
                      the module in train mode; the running statistics stored in
                      weights.safetensors are those of `eval` mode and are what eval uses).
                      And in eval mode only:
                        eval.trace              [1] the exact Hessian trace of the mean loss,
                                                sum over every parameter element i of
                                                e_i^T H e_i (one exact HVP per basis vector)
                        eval.trace.NAME         [1] the trace of NAME's diagonal block
                      NAME runs over the trainable parameters (module.named_parameters()), i.e.
                      the state_dict keys ending in .weight / .bias.

Parameter counts d: vgg_bn 4450, gelu_mlp 7562, small_resnet 8754.
"""

import argparse
import copy
import filecmp
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_torch  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "models", "tests", "fixtures", "nets"))
N = 8
INPUT_SHAPE = (3, 32, 32)
FILES = ("network.json", "weights.safetensors", "case.safetensors")


# ---------------------------------------------------------------------------------------------
# the networks, as a researcher would write them


class VGG(nn.Module):
    """A small VGG with BatchNorm."""

    def __init__(self, num_classes=10, dropout=False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.AvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 32),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5) if dropout else nn.Identity(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def gelu_mlp():
    """A pooled-input MLP with GELU and Tanh."""
    return nn.Sequential(
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(192, 32),
        nn.GELU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


class BasicBlock(nn.Module):
    """The CIFAR ResNet basic block (two 3x3 convolutions), projection shortcut when the shape
    changes."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class SmallResNet(nn.Module):
    """A stem and one stage of two basic blocks (8 -> 16 channels, stride 2)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.avgpool(out)
        out = torch.flatten(out, 1)
        return self.fc(out)


CASES = [
    ("vgg_bn", VGG, 1),
    ("gelu_mlp", gelu_mlp, 2),
    ("small_resnet", SmallResNet, 3),
]


def build(factory, seed):
    """The case's float64 module with its final weights (BatchNorm state moved), in eval mode.
    Leaves the global torch RNG right after the BatchNorm warm-up."""
    torch.manual_seed(seed)
    module = factory().double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    module.train()
    with torch.no_grad():
        for _ in range(2):
            module(torch.randn(N, *INPUT_SHAPE, dtype=torch.float64))
    module.eval()
    return module


# ---------------------------------------------------------------------------------------------
# references


def trainable(module):
    """The trainable parameters, (name, tensor) in named_parameters() order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def references(module, x, y, v):
    """logits, loss, grad and HVP (double backward) of the mean cross-entropy, float64."""
    params = trainable(module)
    logits = module(x)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
    dot = sum((g * v[n]).sum() for (n, _), g in zip(params, grads))
    hvps = torch.autograd.grad(dot, [p for _, p in params])
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for (n, _), g, h in zip(params, grads, hvps):
        out[f"grad.{n}"] = g.detach()
        out[f"hvp.{n}"] = h.detach()
    return out


def exact_trace(module, x, y):
    """The exact Hessian diagonal of the mean cross-entropy (module in eval mode): for every
    parameter element i, e_i^T H e_i = d(dL/d theta_i)/d theta_i by double backward (the
    element's row of H, computed for its own tensor only). Returns {name: diagonal tensor of
    that parameter's shape}. (A plain loop: on CPU it beats torch.func.vmap over basis vectors,
    whose convolution double-backward batches poorly.)"""
    params = trainable(module)
    tensors = [p for _, p in params]
    loss = F.cross_entropy(module(x), y)
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    diag = {}
    for (n, p), g in zip(params, grads):
        flat_g = g.reshape(-1)
        flat = torch.empty(p.numel(), dtype=torch.float64)
        for i in range(p.numel()):
            (row,) = torch.autograd.grad(flat_g[i], [p], retain_graph=True)
            flat[i] = row.reshape(-1)[i]
        diag[n] = flat.view(p.shape)
    return diag


def spot_check(module, x, y, diag, count=8, seed=0):
    """Compares a few diagonal entries with an independent computation: torch.func's
    reverse-over-reverse HVP (vmapped over the basis vectors) of the functional loss."""
    from torch.func import functional_call, grad, vjp, vmap

    params = {n: p.detach() for n, p in trainable(module)}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    names = list(params)

    def loss_of(ps):
        return F.cross_entropy(functional_call(module, (ps, buffers), (x,)), y)

    _, vjp_fn = vjp(grad(loss_of), params)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for _ in range(count):
        n = names[int(torch.randint(len(names), (1,), generator=g))]
        picks.append((n, int(torch.randint(params[n].numel(), (1,), generator=g))))
    cot = {m: torch.zeros((count, *params[m].shape), dtype=torch.float64) for m in names}
    for k, (n, i) in enumerate(picks):
        cot[n][k].view(-1)[i] = 1.0
    (hv,) = vmap(vjp_fn)(cot)
    for k, (n, i) in enumerate(picks):
        want = hv[n][k].reshape(-1)[i].item()
        got = diag[n].reshape(-1)[i].item()
        if abs(want - got) > 1e-10 * max(1.0, abs(want)):
            raise AssertionError(f"trace spot check {n}[{i}]: double backward {got!r} vs "
                                 f"torch.func {want!r}")


def make_case(name, factory, seed, out_dir):
    """Writes the case folder; returns a summary dict."""
    t0 = time.time()
    module = build(factory, seed)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    export_torch.export(module, os.path.join(folder, "network.json"), input_shape=INPUT_SHAPE)
    save_file(module.state_dict(), os.path.join(folder, "weights.safetensors"))

    x = torch.randn(N, *INPUT_SHAPE, dtype=torch.float64)
    y = torch.randint(0, 10, (N,), dtype=torch.int64)
    params = trainable(module)
    v = {n: torch.rand(p.shape, dtype=torch.float64) * 2 - 1 for n, p in params}

    case = {"x": x, "y": y}
    for n, t in v.items():
        case[f"v.{n}"] = t
    for mode in ("train", "eval"):
        m = copy.deepcopy(module)
        m.train(mode == "train")
        for k, t in references(m, x, y, v).items():
            case[f"{mode}.{k}"] = t
    m = copy.deepcopy(module).eval()
    diag = exact_trace(m, x, y)
    spot_check(m, x, y, diag)
    total = torch.zeros((), dtype=torch.float64)
    per = {}
    for n, _ in params:
        s = diag[n].sum()
        per[n] = s.item()
        case[f"eval.trace.{n}"] = s.reshape(1)
        total = total + s
    case["eval.trace"] = total.reshape(1)
    save_file({k: t.contiguous() for k, t in case.items()},
              os.path.join(folder, "case.safetensors"))
    # the stored weights must still be what eval used
    return {
        "case": name,
        "d": sum(p.numel() for _, p in params),
        "trace": total.item(),
        "eval_loss": case["eval.loss"].item(),
        "train_loss": case["train.loss"].item(),
        "seconds": time.time() - t0,
    }


def generate(out_dir, verbose=True):
    """Writes every case folder under out_dir; returns the summaries."""
    torch.set_num_threads(1)
    summaries = []
    for name, factory, seed in CASES:
        s = make_case(name, factory, seed, out_dir)
        if verbose:
            print(f"{s['case']}: d={s['d']} trace={s['trace']!r} eval loss={s['eval_loss']!r} "
                  f"train loss={s['train_loss']!r} ({s['seconds']:.1f} s)", flush=True)
        summaries.append(s)
    return summaries


def check(out_dir):
    """Regenerates into a temporary folder and compares with out_dir byte for byte; returns the
    list of differences (empty when identical)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, verbose=False)
        for name, _, _ in CASES:
            for f in FILES:
                a = os.path.join(out_dir, name, f)
                b = os.path.join(tmp, name, f)
                if not os.path.exists(a):
                    problems.append(f"{a}: missing")
                elif not filecmp.cmp(a, b, shallow=False):
                    problems.append(f"{a}: differs from a fresh generation")
            extra = set(os.listdir(os.path.join(out_dir, name))) - set(FILES) \
                if os.path.isdir(os.path.join(out_dir, name)) else set()
            problems.extend(f"{os.path.join(out_dir, name, e)}: unexpected file"
                            for e in sorted(extra))
    return problems


def main(argv=None):
    """Command line: writes the fixtures (or with --check verifies them); the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT, help=f"fixtures folder (default {OUT})")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and verify the files in --out "
                         "are identical (exit 1 otherwise)")
    a = ap.parse_args(argv)
    if a.check:
        problems = check(a.out)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"{len(problems)} fixture file(s) differ; rerun tools/make_net_fixtures.py",
                  file=sys.stderr)
            return 1
        print(f"{a.out}: all {len(CASES) * len(FILES)} files identical to a fresh generation")
        return 0
    t0 = time.time()
    generate(a.out)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
