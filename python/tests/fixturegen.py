"""Numpy port of the golden fixtures' counter-based generator and fixture reader.

The generator ("splitmix64-ctr-v1") is documented in the docstring of
`tools/make_fixtures.py` and implemented bit for bit in `models/tests/common/mod.rs`; this is
the same thing, vectorized, with numpy only (no torch): uint64 arithmetic with wrap-around,
`uniform`, the generated state_dict of a preset (from its state_dict names and shapes), the
batch, the HVP directions, and a reader of fixture files (whole tensors, or
NAME.samples / NAME.stats / NAME.shape for tensors of more than 4096 elements) with the
relative-error comparison of `common/mod.rs`.
"""

import json
import math
import os
import struct

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(REPO, "models", "tests", "fixtures")
NET_FIXTURES = os.path.join(FIXTURES, "nets")

GENERATOR = "splitmix64-ctr-v1"
SAMPLES = 4096
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PIXEL_STREAM = 1 << 32
LABEL_STREAM = (1 << 32) + 1
DIR_STREAM = 2 << 32

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_SEED_XOR = _U(0x243F6A8885A308D3)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)


# ---------------------------------------------------------------------------------------------
# generator


def mix(z):
    """splitmix64's finalizer on a uint64 array (or scalar), with wrap-around."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> _U(30))
        z = z * _M1
        z = z ^ (z >> _U(27))
        z = z * _M2
        return z ^ (z >> _U(31))


def stream_key(seed, stream):
    """key(seed, stream) = mix(mix(seed ^ C) + stream * GOLDEN), as a numpy uint64."""
    s = np.array([seed], dtype=np.uint64)
    t = np.array([stream], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix(mix(s ^ _SEED_XOR) + t * _GOLDEN)[0]


def bits(seed, stream, n):
    """The first n uint64 outputs of a stream: mix(key + (i + 1) * GOLDEN), i = 0..n-1."""
    key = stream_key(seed, stream)
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        return mix(key + i * _GOLDEN)


def unit(seed, stream, n):
    """n floats in [0, 1) from the top 53 bits (exact)."""
    return (bits(seed, stream, n) >> _U(11)).astype(np.float64) * (2.0 ** -53)


def uniform(seed, stream, shape, lo, hi):
    """lo + (hi - lo) * unit, float64, of the given shape (row-major stream order)."""
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    lo, hi = np.float64(lo), np.float64(hi)
    return (lo + (hi - lo) * unit(seed, stream, n)).reshape(shape)


def make_batch(seed, n):
    """The normalized float64 batch [n, 3, 32, 32] and its int64 labels [n]."""
    pix = (bits(seed, PIXEL_STREAM, n * 3 * 32 * 32) >> _U(56)).astype(np.float64)
    pix = pix.reshape(n, 3, 32, 32)
    mean = np.array(MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.array(STD, dtype=np.float64).reshape(1, 3, 1, 1)
    x = (pix / 255.0 - mean) / std
    with np.errstate(over="ignore"):
        labels = (((bits(seed, LABEL_STREAM, n) >> _U(32)) * _U(10)) >> _U(32)).astype(np.int64)
    return x, labels


# ---------------------------------------------------------------------------------------------
# generated state


BN_RANGES = {
    "weight": (0.5, 1.5),
    "bias": (-0.2, 0.2),
    "running_mean": (-0.2, 0.2),
    "running_var": (0.5, 1.5),
}


def entry_kinds(entries):
    """For (name, shape) pairs in state_dict order: a list of (name, shape, kind, lo, hi), kind
    one of "weight", "bias" (Linear/Conv, bounds +-1/sqrt(fan_in)), "bn" (BatchNorm weight,
    bias, running statistics) or "count" (num_batches_tracked, lo/hi None). A module is a
    BatchNorm when it has a running_mean entry. A bias takes the fan_in of its module's weight
    (the weight before it)."""
    entries = [(str(n), tuple(int(d) for d in s)) for n, s in entries]
    names = {n for n, _ in entries}
    shapes = dict(entries)
    out = []
    last_weight = None
    for name, shape in entries:
        mod, _, leaf = name.rpartition(".")
        prefix = f"{mod}." if mod else ""
        if leaf == "num_batches_tracked":
            out.append((name, shape, "count", None, None))
            continue
        if f"{prefix}running_mean" in names:
            lo, hi = BN_RANGES[leaf]
            out.append((name, shape, "bn", lo, hi))
            continue
        if leaf == "weight":
            if len(shape) < 2:
                raise ValueError(f"{name}: a Linear/Conv weight needs >= 2 dims, got {shape}")
            fan_in = int(np.prod(shape[1:]))
            last_weight = name
            kind = "weight"
        elif leaf == "bias":
            w = f"{prefix}weight"
            if w not in shapes:
                w = last_weight
            if w is None:
                raise ValueError(f"{name}: no weight before this bias")
            fan_in = int(np.prod(shapes[w][1:]))
            kind = "bias"
        else:
            raise ValueError(f"unexpected state entry {name}")
        b = 1.0 / math.sqrt(fan_in)
        out.append((name, shape, kind, -b, b))
    return out


def generated_state(entries, seed):
    """The generated state_dict for (name, shape) pairs in state_dict order (buffers
    included): entry e draws from stream e; float64 arrays, num_batches_tracked int64 zeros
    of its shape."""
    state = {}
    for e, (name, shape, kind, lo, hi) in enumerate(entry_kinds(entries)):
        if kind == "count":
            state[name] = np.zeros(shape, dtype=np.int64)
        else:
            state[name] = uniform(seed, e, shape, lo, hi)
    return state


def directions(seed, params, stream_offset=0):
    """One HVP direction: {name: uniform(-1, 1)} for (name, shape) pairs of the trainable
    parameters in order, parameter j drawing from stream DIR_STREAM + stream_offset + j.
    (stream_offset = 0 is the fixtures' direction.)"""
    return {name: uniform(seed, DIR_STREAM + stream_offset + j, shape, -1.0, 1.0)
            for j, (name, shape) in enumerate(params)}


def state_order_string(entries):
    """The fixtures' "state_dict" metadata string for (name, shape) pairs."""
    return ";".join(f"{n}:{'x'.join(str(int(d)) for d in s)}" for n, s in entries)


def parse_state_order(text):
    """(name, shape) pairs from a fixture's "state_dict" metadata string."""
    out = []
    for item in text.split(";"):
        name, _, dims = item.partition(":")
        out.append((name, tuple(int(d) for d in dims.split("x")) if dims else ()))
    return out


# ---------------------------------------------------------------------------------------------
# fixtures


def sample_indices(length):
    """The flat indices kept for a tensor of `length` > 4096 elements."""
    k = np.arange(SAMPLES, dtype=np.int64)
    return (k * (int(length) - 1)) // (SAMPLES - 1)


def stats(a):
    """[sum, sum of squares, sum of absolute values] of a float64 array."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    return np.array([a.sum(), (a * a).sum(), np.abs(a).sum()])


def read_metadata(path):
    """The __metadata__ strings of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return dict(header.get("__metadata__") or {})


class Stored:
    """A reference tensor: whole (samples is None) or sampled with statistics."""

    def __init__(self, name, shape, values, stats=None):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.values = np.asarray(values, dtype=np.float64).reshape(-1)
        self.stats = None if stats is None else np.asarray(stats, dtype=np.float64)

    @property
    def sampled(self):
        return self.stats is not None

    def pick(self, actual):
        """The entries of the full tensor `actual` that correspond to `values`."""
        flat = np.asarray(actual, dtype=np.float64).reshape(-1)
        return flat[sample_indices(flat.size)] if self.sampled else flat

    def max_abs(self):
        return float(np.max(np.abs(self.values))) if self.values.size else 0.0


class Fixture:
    """One fixture file of models/tests/fixtures (tensors and metadata)."""

    def __init__(self, name_or_path):
        path = name_or_path
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(FIXTURES, name_or_path)
            if not path.endswith(".safetensors"):
                path += ".safetensors"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fixture {path} is missing")
        self.path = path
        self.tensors = load_file(path)
        self.meta = read_metadata(path)

    def __contains__(self, name):
        return name in self.tensors or f"{name}.samples" in self.tensors

    @property
    def seed(self):
        assert self.meta["generator"] == GENERATOR, self.path
        return int(self.meta["seed"])

    @property
    def batch(self):
        return int(self.meta["batch"])

    def state_order(self):
        return parse_state_order(self.meta["state_dict"])

    def params(self):
        return self.meta["params"].split(",")

    def stored(self, name):
        if name in self.tensors:
            t = self.tensors[name]
            return Stored(name, t.shape, t)
        shape = tuple(int(d) for d in self.tensors[f"{name}.shape"])
        samples = self.tensors[f"{name}.samples"]
        s = self.tensors[f"{name}.stats"]
        assert samples.shape == (SAMPLES,) and s.shape == (3,), (self.path, name)
        return Stored(name, shape, samples, s)


def rel_error(stored, actual, shape_check=True):
    """Relative error of the full tensor `actual` against a Stored reference, as in
    models/tests/common/mod.rs: max |a - r| over the stored entries / max |r|, and for sampled
    references also |Δsum| / Σ|r| and |Δ(sum of squares)| / Σ r²; the worst. NaN -> inf."""
    a = np.asarray(actual, dtype=np.float64)
    if shape_check:
        shape = a.shape if a.ndim else (1,)
        assert tuple(shape) == stored.shape, \
            f"{stored.name}: shape {tuple(shape)} differs from the reference {stored.shape}"
    picked = stored.pick(a)
    if np.isnan(picked).any() or not np.isfinite(a).all():
        return math.inf
    diff = float(np.max(np.abs(picked - stored.values))) if picked.size else 0.0
    scale = stored.max_abs()
    err = diff / scale if scale > 0 else diff
    if stored.sampled:
        s = stored.stats
        got = stats(a)
        tiny = np.finfo(np.float64).tiny
        err = max(err, abs(got[0] - s[0]) / max(s[2], tiny), abs(got[1] - s[1]) / max(s[1], tiny))
    return err


def abs_error(stored, actual):
    """max |a - r| over the stored entries (shapes checked)."""
    a = np.asarray(actual, dtype=np.float64)
    shape = a.shape if a.ndim else (1,)
    assert tuple(shape) == stored.shape, f"{stored.name}: shape {tuple(shape)} vs {stored.shape}"
    picked = stored.pick(a)
    if np.isnan(picked).any():
        return math.inf
    return float(np.max(np.abs(picked - stored.values))) if picked.size else 0.0


# ---------------------------------------------------------------------------------------------
# helpers for a flatmin.Net (duck-typed: no flatmin import here)


def net_entries(net):
    """(name, shape) pairs of net.state_dict() in its order."""
    return [(n, tuple(np.shape(a))) for n, a in net.state_dict().items()]


def net_params(net):
    """(name, shape) pairs of the trainable parameters, in net.param_names order."""
    sd = net.state_dict()
    return [(n, tuple(np.shape(sd[n]))) for n in net.param_names]


def load_generated(net, seed):
    """Loads the generated state (seed) into net; returns it."""
    state = generated_state(net_entries(net), seed)
    net.load_state_dict(state)
    return state


def net_directions(net, seed, stream_offset=0):
    """The generated HVP direction for net's trainable parameters."""
    return directions(seed, net_params(net), stream_offset)
