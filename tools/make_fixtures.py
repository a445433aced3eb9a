"""Golden fixtures: PyTorch float64 references for flatmin's preset models.

Regenerate (from the workspace root, with the project's Python environment, which has torch,
numpy and safetensors):

    /work/venv/bin/python tools/make_fixtures.py

This rewrites every file in models/tests/fixtures/. The Rust side is
models/tests/golden.rs (with models/tests/common/mod.rs), run by

    cargo test -p flatmin-models --test golden -- --nocapture

and needs neither Python nor network: it regenerates the same weights, batch and direction
from the counter-based generator below, which models/tests/common/mod.rs implements bit for bit.

Generator ("splitmix64-ctr-v1"), all arithmetic on uint64 with wrap-around:

    mix(z)  = z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb;
              z ^ (z >> 31)                                (splitmix64's finalizer)
    key(seed, stream) = mix(mix(seed ^ 0x243f6a8885a308d3) + stream * 0x9e3779b97f4a7c15)
    bits(seed, stream, i) = mix(key(seed, stream) + (i + 1) * 0x9e3779b97f4a7c15)
    unit(seed, stream, i) = (bits >> 11) * 2**-53           (a float64 in [0, 1), exact)
    uniform(lo, hi) = lo + (hi - lo) * unit                  (float64, no fused multiply-add)

Streams: state entry number e (its index in state_dict order, buffers included) uses stream e;
pixels stream 2**32, labels stream 2**32 + 1; the HVP direction of trainable parameter number
j (its index among the trainable parameters) uses stream 2 * 2**32 + j. Element i of a stream
is the i-th flat (row-major) element of the tensor.

Values: Linear/Conv weight and bias uniform(-b, b) with b = 1 / sqrt(fan_in) (fan_in =
in_features, or in_channels * kh * kw), the distribution of PyTorch's default init;
BatchNorm weight uniform(0.5, 1.5), bias uniform(-0.2, 0.2), running_mean uniform(-0.2, 0.2),
running_var uniform(0.5, 1.5), num_batches_tracked 0. Pixel byte = bits >> 56; label =
((bits >> 32) * 10) >> 32; input x = (pixel / 255 - mean_c) / std_c in float64 with mean
(0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616), pixel element i of the batch
[N, 3, 32, 32] in row-major order. Direction entries uniform(-1, 1).

Storage: float64 outputs. A tensor with at most 4096 elements is stored whole under its name.
A larger one of L elements is stored as NAME.samples (float64 [4096], the values at flat
indices idx_k = (k * (L - 1)) // 4095, k = 0..4095, integer arithmetic), NAME.stats (float64
[3]: sum, sum of squares, sum of absolute values over all L elements) and NAME.shape (int64,
its full shape). Scalars (loss) are float64 [1]. Metadata (strings) record the generator, seed,
model, BatchNorm mode, batch size and the state_dict order with shapes.

Cases (seed in parentheses):
  tiny-tanh, mlp-s, cnn-s        logits, loss, grads, HVPs (no BatchNorm), N = 8
  resnet20-train, resnet20-eval  the same, BatchNorm with batch statistics (model.train()) or
                                 running statistics (model.eval()); N = 8. The train case also
                                 stores the running statistics after one train-mode forward.
  resnet18-train, resnet18-eval  the same with N = 2 (gradients and HVPs stored as samples)
  backpack-tiny-tanh, backpack-cnn-s
                                 BackPACK's DiagHessian (exact Hessian diagonal of the mean
                                 cross-entropy, float64) on generated weights and N = 32
                                 (tiny-tanh) / 16 (cnn-s) generated images: the diagonal of
                                 every parameter (diag.NAME), its trace per tensor and in all
                                 (trace), and the loss. Needs `pip install backpack-for-pytorch`
                                 (imported only for these cases).
  tiny-tanh-ckpt, resnet20-ckpt  a float32 state_dict saved by safetensors.torch.save_file
                                 (<case>.safetensors, loadable as is) after two train-mode
                                 forwards (so num_batches_tracked = 2 and running stats moved),
                                 and <case>.expected.safetensors: logits and loss computed in
                                 float64 from those float32 weights, eval and train mode.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "models", "tests", "fixtures")

GENERATOR = "splitmix64-ctr-v1"
SAMPLES = 4096
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PIXEL_STREAM = 1 << 32
LABEL_STREAM = (1 << 32) + 1
DIR_STREAM = 2 << 32

# ---------------------------------------------------------------------------------------------
# Reference modules, exactly as in docs/reference_models.md.

ACT = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "softplus": F.softplus,
       "sigmoid": torch.sigmoid}


class MLP(nn.Module):
    """mlp-s = MLP([3072, 256, 256, 10], "relu");
    tiny-tanh = MLP([192, 32, 10], "tanh", input_pool=4)."""
    def __init__(self, widths, act="relu", input_pool=1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act, self.input_pool = ACT[act], input_pool

    def forward(self, x):
        if self.input_pool > 1:
            x = F.avg_pool2d(x, self.input_pool)
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class CNN(nn.Module):
    """cnn-s."""
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """resnet20 = ResNet([3, 3, 3], [16, 32, 64]);
    resnet18 = ResNet([2, 2, 2, 2], [64, 128, 256, 512])."""
    def __init__(self, blocks, widths, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, layers = widths[0], []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        for i, stage in enumerate(layers):
            self.add_module(f"layer{i + 1}", stage)
        self.n_stages = len(layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


PRESETS = {
    "tiny-tanh": lambda: MLP([192, 32, 10], "tanh", input_pool=4),
    "mlp-s": lambda: MLP([3072, 256, 256, 10], "relu"),
    "cnn-s": CNN,
    "resnet20": lambda: ResNet([3, 3, 3], [16, 32, 64]),
    "resnet18": lambda: ResNet([2, 2, 2, 2], [64, 128, 256, 512]),
}

# ---------------------------------------------------------------------------------------------
# Counter-based generator (identical in models/tests/common/mod.rs).

U = np.uint64
GOLDEN = U(0x9E3779B97F4A7C15)


def mix(z):
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> U(30))
        z = z * U(0xBF58476D1CE4E5B9)
        z = z ^ (z >> U(27))
        z = z * U(0x94D049BB133111EB)
        return z ^ (z >> U(31))


def stream_key(seed, stream):
    with np.errstate(over="ignore"):
        a = mix(np.array([seed], dtype=np.uint64) ^ U(0x243F6A8885A308D3))
        return mix(a + np.array([stream], dtype=np.uint64) * GOLDEN)[0]


def bits(seed, stream, n):
    """The first n uint64 outputs of a stream."""
    key = stream_key(seed, stream)
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        return mix(key + i * GOLDEN)


def unit(seed, stream, n):
    return (bits(seed, stream, n) >> U(11)).astype(np.float64) * (2.0 ** -53)


def uniform(seed, stream, shape, lo, hi):
    n = int(np.prod(shape, dtype=np.int64))
    lo, hi = np.float64(lo), np.float64(hi)
    return (lo + (hi - lo) * unit(seed, stream, n)).reshape(shape)


def make_batch(seed, n):
    """Normalized float64 input [n, 3, 32, 32] and int64 labels [n]."""
    pix = (bits(seed, PIXEL_STREAM, n * 3 * 32 * 32) >> U(56)).astype(np.float64)
    pix = pix.reshape(n, 3, 32, 32)
    mean = np.array(MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.array(STD, dtype=np.float64).reshape(1, 3, 1, 1)
    x = (pix / 255.0 - mean) / std
    with np.errstate(over="ignore"):
        labels = (((bits(seed, LABEL_STREAM, n) >> U(32)) * U(10)) >> U(32)).astype(np.int64)
    return x, labels


def generated_state(model, seed):
    """The generated state_dict (float64 tensors, int64 counters) for a reference module."""
    modules = dict(model.named_modules())
    state = {}
    for e, (name, t) in enumerate(model.state_dict().items()):
        mod_name, _, leaf = name.rpartition(".")
        mod = modules[mod_name]
        shape = tuple(t.shape)
        if isinstance(mod, nn.BatchNorm2d):
            lo_hi = {"weight": (0.5, 1.5), "bias": (-0.2, 0.2), "running_mean": (-0.2, 0.2),
                     "running_var": (0.5, 1.5)}
            if leaf == "num_batches_tracked":
                state[name] = torch.zeros((), dtype=torch.int64)
                continue
            lo, hi = lo_hi[leaf]
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = int(np.prod(mod.weight.shape[1:]))
            b = 1.0 / math.sqrt(fan_in)
            lo, hi = -b, b
        else:
            raise ValueError(f"unexpected state entry {name}")
        state[name] = torch.from_numpy(uniform(seed, e, shape, lo, hi))
    return state


def build(preset, seed, dtype=torch.float64):
    model = PRESETS[preset]().to(dtype)
    model.load_state_dict(generated_state(model, seed))
    return model


def param_names(model):
    names = [n for n, _ in model.named_parameters()]
    in_sd = [n for n in model.state_dict().keys() if n in set(names)]
    assert names == in_sd, "parameter order differs from state_dict order"
    return names


def state_order(model):
    return ";".join(f"{n}:{'x'.join(str(d) for d in t.shape)}"
                    for n, t in model.state_dict().items())

# ---------------------------------------------------------------------------------------------
# Storage.


def sample_indices(length):
    k = np.arange(SAMPLES, dtype=np.int64)
    return (k * (length - 1)) // (SAMPLES - 1)


def put(out, name, value):
    """Stores a float tensor whole or sampled (see the module docstring)."""
    a = np.ascontiguousarray(np.asarray(value, dtype=np.float64))
    if a.size <= SAMPLES:
        out[name] = a.reshape(a.shape if a.ndim > 0 else (1,))
        return
    flat = a.reshape(-1)
    out[f"{name}.samples"] = np.ascontiguousarray(flat[sample_indices(flat.size)])
    out[f"{name}.stats"] = np.array([flat.sum(), (flat * flat).sum(), np.abs(flat).sum()])
    out[f"{name}.shape"] = np.array(a.shape, dtype=np.int64)


def put_stats(out, name, value):
    a = np.asarray(value, dtype=np.float64).reshape(-1)
    out[name] = np.array([a.sum(), (a * a).sum(), np.abs(a).sum()])


def write(path, tensors, meta):
    """Writes a safetensors file byte-reproducibly: tensors and metadata keys in sorted order
    (the safetensors library orders metadata by hash, so its files differ run to run).
    The result is read back with the safetensors library and checked."""
    dtypes = {np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}
    header = {"__metadata__": {k: str(meta[k]) for k in sorted(meta)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    back = load_numpy(path)
    assert sorted(back) == sorted(tensors)
    assert all(np.array_equal(back[k], tensors[k]) and back[k].shape == tensors[k].shape
               for k in tensors), path
    size = os.path.getsize(path)
    print(f"  {os.path.relpath(path)}: {len(tensors)} tensors, {size / 1024:.0f} KiB")
    return size

# ---------------------------------------------------------------------------------------------
# Cases.

CASES = [
    # name, preset, bn mode, batch, seed, with derivatives[, loss (default ce)]
    ("tiny-tanh", "tiny-tanh", "none", 8, 1001, True),
    ("mlp-s", "mlp-s", "none", 8, 1002, True),
    ("cnn-s", "cnn-s", "none", 8, 1003, True),
    ("resnet20-train", "resnet20", "train", 8, 1004, True),
    ("resnet20-eval", "resnet20", "eval", 8, 1005, True),
    ("resnet18-train", "resnet18", "train", 2, 1006, True),
    ("resnet18-eval", "resnet18", "eval", 2, 1007, True),
    ("tiny-tanh-mse", "tiny-tanh", "none", 8, 1008, True, "mse"),
    ("cnn-s-mse", "cnn-s", "none", 8, 1009, True, "mse"),
    ("resnet20-eval-mse", "resnet20", "eval", 8, 1010, True, "mse"),
]

BACKPACK_CASES = [
    # name, preset, batch, seed
    ("backpack-tiny-tanh", "tiny-tanh", 32, 3001),
    ("backpack-cnn-s", "cnn-s", 16, 3002),
]

CKPT_CASES = [
    ("tiny-tanh-ckpt", "tiny-tanh", 2001),
    ("resnet20-ckpt", "resnet20", 2002),
]


def objective(logits, labels, loss_fn):
    """The training objective: mean cross-entropy, or MSE against one-hot targets (mean over
    all N*C logits, flatmin's `--loss mse`)."""
    if loss_fn == "mse":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return F.mse_loss(logits, target)
    return F.cross_entropy(logits, labels)


def evaluate(model, x, labels, dirs, with_derivatives, loss_fn="ce"):
    params = list(model.parameters())
    logits = model(x)
    loss = objective(logits, labels, loss_fn)
    if not with_derivatives:
        return logits.detach(), loss.detach(), None, None
    g = torch.autograd.grad(loss, params, create_graph=True)
    gv = sum((gi * vi).sum() for gi, vi in zip(g, dirs))
    hv = torch.autograd.grad(gv, params)
    return logits.detach(), loss.detach(), [t.detach() for t in g], [t.detach() for t in hv]


def perturb_running_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(3.0)
                m.running_var.mul_(7.0)


def golden_case(name, preset, bn, n, seed, with_derivatives, loss_fn="ce"):
    model = build(preset, seed)
    names = param_names(model)
    x_np, labels_np = make_batch(seed, n)
    x, labels = torch.from_numpy(x_np), torch.from_numpy(labels_np)
    dirs = [torch.from_numpy(uniform(seed, DIR_STREAM + j, tuple(p.shape), -1.0, 1.0))
            for j, p in enumerate(model.parameters())]
    out = {}
    put(out, "input.x", x_np)
    out["input.labels"] = labels_np
    out["check.bits"] = bits(seed, 0, 4).view(np.int64)
    for e, (sname, t) in enumerate(model.state_dict().items()):
        if t.is_floating_point():
            put_stats(out, f"init.{sname}", t.numpy())

    model.train(bn != "eval")
    logits, loss, grads, hvps = evaluate(model, x, labels, dirs, with_derivatives, loss_fn)
    if bn == "train":
        # PyTorch's train-mode forward just folded the batch statistics into the running
        # statistics (momentum 0.1, unbiased variance): store them for flatmin's update.
        for sname, t in model.state_dict().items():
            if "running_" in sname:
                put(out, f"after.{sname}", t.numpy())
            elif sname.endswith("num_batches_tracked"):
                out[f"after.{sname}"] = t.reshape(1).numpy().astype(np.int64)
        # Train mode must use batch statistics only: running statistics far from the
        # generated ones must not change a single bit of any output.
        other = build(preset, seed)
        perturb_running_stats(other)
        other.train()
        l2, s2, g2, h2 = evaluate(other, x, labels, dirs, with_derivatives, loss_fn)
        assert torch.equal(l2, logits) and torch.equal(s2, loss)
        if with_derivatives:
            assert all(torch.equal(a, b) for a, b in zip(g2 + h2, grads + hvps))

    put(out, "logits", logits.numpy())
    put(out, "loss", loss.reshape(1).numpy())
    if with_derivatives:
        for pname, g, h in zip(names, grads, hvps):
            put(out, f"grad.{pname}", g.numpy())
            put(out, f"hvp.{pname}", h.numpy())
    meta = {
        "generator": GENERATOR, "seed": seed, "model": preset, "bn_mode": bn, "batch": n,
        "derivatives": "grad,hvp" if with_derivatives else "none",
        "state_dict": state_order(model), "params": ",".join(names),
        "torch": torch.__version__,
    }
    if loss_fn != "ce":
        # Absent means cross-entropy (the fixtures written before the key existed).
        meta["loss"] = loss_fn
    print(f"{name}: loss {loss.item():.6f}")
    return write(os.path.join(OUT, f"{name}.safetensors"), out, meta)


def backpack_case(name, preset, n, seed):
    """BackPACK's exact Hessian diagonal (DiagHessian) of the mean cross-entropy."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian
    from importlib.metadata import version

    ref = build(preset, seed)
    names = param_names(ref)
    x_np, labels_np = make_batch(seed, n)
    x, labels = torch.from_numpy(x_np), torch.from_numpy(labels_np)
    # BackPACK propagates second-order information module by module, so it needs the net as
    # an nn.Sequential of modules it knows; this one computes the reference module's function
    # with the same parameters (checked bit for bit on the logits).
    if preset == "tiny-tanh":
        layers = [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 32), nn.Tanh(),
                  nn.Linear(32, 10)]
    elif preset == "cnn-s":
        layers = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                  nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)]
    else:
        raise ValueError(f"no BackPACK form of {preset}")
    model = nn.Sequential(*layers).to(torch.float64)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.shape == q.shape
            p.copy_(q)
        assert torch.equal(model(x), ref(x)), "the Sequential form differs from the reference"
    model = extend(model)
    lossf = extend(nn.CrossEntropyLoss())
    model.zero_grad()
    loss = lossf(model(x), labels)
    with backpack(DiagHessian()):
        loss.backward()
    out = {"input.labels": labels_np}
    put(out, "input.x", x_np)
    total = 0.0
    for pname, p in zip(names, model.parameters()):
        d = p.diag_h.detach().numpy()
        put(out, f"diag.{pname}", d)
        out[f"trace.{pname}"] = np.array([d.sum()])
        total += float(d.sum())
    out["trace"] = np.array([total])
    out["loss"] = loss.detach().reshape(1).numpy()
    meta = {"generator": GENERATOR, "seed": seed, "model": preset, "batch": n,
            "method": "backpack DiagHessian", "backpack": version("backpack-for-pytorch"),
            "params": ",".join(names), "torch": torch.__version__}
    print(f"{name}: loss {loss.item():.6f}, BackPACK trace {total:.12e}")
    return write(os.path.join(OUT, f"{name}.safetensors"), out, meta)


def checkpoint_case(name, preset, seed):
    """A real float32 PyTorch checkpoint plus float64 logits computed from its weights."""
    model = build(preset, seed).float()
    model.train()
    with torch.no_grad():
        for b in range(2):
            xb, _ = make_batch(seed + 1 + b, 8)
            model(torch.from_numpy(xb).float())
    ckpt = os.path.join(OUT, f"{name}.safetensors")
    save_torch(model.state_dict(), ckpt)
    size = os.path.getsize(ckpt)
    print(f"  {os.path.relpath(ckpt)}: float32 state_dict, {size / 1024:.0f} KiB")

    ref = PRESETS[preset]().double()
    loaded = load_torch(ckpt)
    ref.load_state_dict({k: (v.double() if v.is_floating_point() else v)
                         for k, v in loaded.items()})
    x_np, labels_np = make_batch(seed, 8)
    x, labels = torch.from_numpy(x_np), torch.from_numpy(labels_np)
    out = {"input.labels": labels_np}
    put(out, "input.x", x_np)
    with torch.no_grad():
        for mode in ("eval", "train"):
            ref.train(mode == "train")
            logits = ref(x)
            put(out, f"logits.{mode}", logits.numpy())
            put(out, f"loss.{mode}", F.cross_entropy(logits, labels).reshape(1).numpy())
    meta = {"generator": GENERATOR, "seed": seed, "model": preset, "batch": 8,
            "checkpoint": os.path.basename(ckpt), "state_dict": state_order(ref),
            "torch": torch.__version__}
    return size + write(os.path.join(OUT, f"{name}.expected.safetensors"), out, meta)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # fixed reduction order: regenerating gives the same bytes
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    total = 0
    for case in CASES:
        if not only or case[0] in only:
            total += golden_case(*case)
    for case in BACKPACK_CASES:
        if not only or case[0] in only:
            total += backpack_case(*case)
    for case in CKPT_CASES:
        if not only or case[0] in only:
            total += checkpoint_case(*case)
    print(f"total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
