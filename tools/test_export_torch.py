"""Self-test of tools/export_torch.py (and of the committed network fixtures' layout).

Run:   /work/venv/bin/python -m pytest tools/test_export_torch.py -q
or:    /work/venv/bin/python tools/test_export_torch.py          (no pytest needed)

Checks: exporting each fixture network of tools/make_net_fixtures.py gives exactly the
committed models/tests/fixtures/nets/<case>/network.json; every unsupported module, argument
and function raises an ExportError (a ValueError) whose message names the module path and type
(or the fx node and its target); load_weights round-trips a float32 safetensors state_dict
strictly and reports missing/unexpected keys; the command line writes the same file; the
committed case.safetensors files have the documented keys and shapes.
"""

import collections
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import export_torch  # noqa: E402
import make_net_fixtures  # noqa: E402

NETS = make_net_fixtures.OUT


def _raises(module, *needles, input_shape=(3, 32, 32)):
    """Exports `module`; asserts an ExportError (a ValueError) whose message contains every
    needle; returns the message."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.json")
        try:
            export_torch.export(module, path, input_shape=input_shape)
        except ValueError as e:
            assert isinstance(e, export_torch.ExportError), type(e)
            msg = str(e)
            for n in needles:
                assert n in msg, f"{n!r} not in error message: {msg}"
            assert not os.path.exists(path), "a failed export must not write the file"
            return msg
    raise AssertionError(f"no error exporting {module}")


def _seq(**named):
    return nn.Sequential(collections.OrderedDict(named))


def _block(inner_name, inner):
    """A network whose offending module sits at path `body.<inner_name>`."""
    return _seq(stem=nn.Conv2d(3, 4, 3, padding=1),
                body=_seq(**{inner_name: inner}),
                pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 10))


# ---------------------------------------------------------------------------------------------
# fixture networks


def test_fixture_networks_export_to_committed_json():
    for name, factory, seed in make_net_fixtures.CASES:
        module = make_net_fixtures.build(factory, seed).train()
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "network.json")
            net = export_torch.export(module, path, input_shape=(3, 32, 32))
            got = open(path, encoding="utf-8").read()
        # the shape run leaves the module as it was: train mode, running statistics untouched
        assert all(m.training for m in module.modules()), name
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
        want = open(os.path.join(NETS, name, "network.json"), encoding="utf-8").read()
        assert got == want, f"{name}: exported JSON differs from the committed network.json"
        assert net["flatmin_network"] == 1 and net["input"] == [3, 32, 32]
        # every state_dict prefix is a layer name
        names = {l["name"] for l in net["layers"]}
        for key in module.state_dict():
            assert key.rsplit(".", 1)[0] in names, key


def test_fixture_network_structure():
    import json

    net = json.load(open(os.path.join(NETS, "small_resnet", "network.json")))
    layers = {l["name"]: l for l in net["layers"]}
    order = [l["name"] for l in net["layers"]]
    # projection block: Add reads bn2 and the shortcut's BN
    adds = [l for l in net["layers"] if l["type"] == "Add"]
    assert adds[0]["inputs"] == ["layer1.0.bn2", "layer1.0.shortcut.1"], adds[0]
    # identity block: Add reads bn2 and the block's input (the first block's last ReLU)
    relu_out = order[order.index(adds[0]["name"]) + 1]
    assert adds[1]["inputs"] == ["layer1.1.bn2", relu_out], adds[1]
    # the projection shortcut reads the block's input (the stem's F.relu), stated explicitly
    assert layers["layer1.0.shortcut.0"]["input"] == "relu", layers["layer1.0.shortcut.0"]
    assert order.index("relu") < order.index("layer1.0.conv1")
    assert layers["layer1.0.conv1"]["stride"] == 2
    assert layers["layer1.0.shortcut.0"]["kernel_size"] == 1
    assert layers["fc"]["in_features"] == 16
    vgg = json.load(open(os.path.join(NETS, "vgg_bn", "network.json")))
    types = [l["type"] for l in vgg["layers"]]
    assert "Identity" in types and types.count("BatchNorm2d") == 3
    assert vgg["layers"][0]["name"] == "features.0"


def test_fixture_case_layout():
    for name, factory, _ in make_net_fixtures.CASES:
        module = factory().double()
        params = dict(module.named_parameters())
        with safe_open(os.path.join(NETS, name, "case.safetensors"), "pt") as f:
            keys = set(f.keys())
            t = {k: f.get_tensor(k) for k in keys}
        want = {"x", "y", "eval.trace"}
        for n in params:
            want |= {f"v.{n}", f"eval.trace.{n}"}
            for m in ("train", "eval"):
                want |= {f"{m}.grad.{n}", f"{m}.hvp.{n}"}
        for m in ("train", "eval"):
            want |= {f"{m}.logits", f"{m}.loss"}
        assert keys == want, (name, sorted(keys ^ want))
        assert t["x"].shape == (8, 3, 32, 32) and t["x"].dtype == torch.float64
        assert t["y"].dtype == torch.int64 and t["y"].shape == (8,)
        assert int(t["y"].min()) >= 0 and int(t["y"].max()) <= 9
        for n, p in params.items():
            for k in (f"v.{n}", f"train.grad.{n}", f"eval.hvp.{n}"):
                assert t[k].shape == p.shape and t[k].dtype == torch.float64, k
        per = sum(float(t[f"eval.trace.{n}"]) for n in params)
        assert abs(per - float(t["eval.trace"])) <= 1e-9 * abs(per), name
        w = load_file(os.path.join(NETS, name, "weights.safetensors"))
        assert list(w) == list(module.state_dict()) or set(w) == set(module.state_dict())
        for k, v in w.items():
            want_dtype = torch.int64 if k.endswith("num_batches_tracked") else torch.float64
            assert v.dtype == want_dtype, k
            if k.endswith("num_batches_tracked"):
                assert int(v) == 2, k


# ---------------------------------------------------------------------------------------------
# unsupported modules and arguments


def test_unknown_module_types():
    _raises(_block("drop", nn.Dropout(0.1)), "'body.drop'", "Dropout")
    _raises(_block("act", nn.LeakyReLU()), "'body.act'", "LeakyReLU")
    _raises(_block("conv", nn.Conv1d(4, 4, 3)), "'body.conv'", "Conv1d")


def test_conv2d_restrictions():
    _raises(_block("c", nn.Conv2d(4, 4, 3, padding=1, groups=2)), "'body.c'", "Conv2d",
            "groups")
    _raises(_block("c", nn.Conv2d(4, 4, 3, padding=2, dilation=2)), "'body.c'", "Conv2d",
            "dilation")
    _raises(_block("c", nn.Conv2d(4, 4, (3, 5), padding=1)), "'body.c'", "Conv2d",
            "kernel_size")
    _raises(_block("c", nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1)), "'body.c'", "Conv2d",
            "stride")
    _raises(_block("c", nn.Conv2d(4, 4, 3, padding=(1, 0))), "'body.c'", "Conv2d", "padding")
    _raises(_block("c", nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), "'body.c'",
            "Conv2d", "padding_mode")
    _raises(_block("c", nn.Conv2d(4, 4, 3, padding="same")), "'body.c'", "Conv2d", "padding")


def test_batchnorm_restrictions():
    _raises(_block("bn", nn.BatchNorm2d(4, affine=False)), "'body.bn'", "BatchNorm2d", "affine")
    _raises(_block("bn", nn.BatchNorm2d(4, track_running_stats=False)), "'body.bn'",
            "BatchNorm2d", "track_running_stats")


def test_pool_restrictions():
    _raises(_block("p", nn.MaxPool2d(2, padding=1)), "'body.p'", "MaxPool2d", "padding")
    _raises(_block("p", nn.MaxPool2d(2, ceil_mode=True)), "'body.p'", "MaxPool2d", "ceil_mode")
    _raises(_block("p", nn.MaxPool2d(2, dilation=2)), "'body.p'", "MaxPool2d", "dilation")
    _raises(_block("p", nn.MaxPool2d((2, 3))), "'body.p'", "MaxPool2d", "kernel_size")
    _raises(_block("p", nn.AvgPool2d(2, padding=1)), "'body.p'", "AvgPool2d", "padding")
    _raises(_block("p", nn.AvgPool2d(2, ceil_mode=True)), "'body.p'", "AvgPool2d", "ceil_mode")
    _raises(_block("p", nn.AvgPool2d(2, divisor_override=3)), "'body.p'", "AvgPool2d",
            "divisor_override")
    _raises(_block("p", nn.AdaptiveAvgPool2d(2)), "'body.p'", "AdaptiveAvgPool2d",
            "output_size")


def test_activation_restrictions():
    _raises(_block("g", nn.GELU(approximate="tanh")), "'body.g'", "GELU", "tanh")
    _raises(_block("s", nn.Softplus(beta=2)), "'body.s'", "Softplus", "beta")
    _raises(_block("s", nn.Softplus(threshold=10)), "'body.s'", "Softplus", "threshold")


def test_flatten_restrictions():
    net = _seq(pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(start_dim=2), fc=nn.Linear(3, 10))
    _raises(net, "'flat'", "Flatten", "start_dim")


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.fc(x), 1))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 10)
        self.b = nn.Linear(10, 10)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class _ReusedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 10)
        self.fc2 = nn.Linear(10, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


def test_module_called_twice():
    _raises(_Shared(), "'fc'", "Linear", "twice", input_shape=(10,))
    _raises(_Tied(), "'b.weight'", "'a.weight'", input_shape=(10,))
    # a parameter-free module may be reused: its second call gets the fx node's name
    net = export_torch.to_network(_ReusedRelu(), (10,))
    assert [l["name"] for l in net["layers"]] == ["fc1", "relu", "fc2", "relu_1"], net


class _Mul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(x) * 2


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        return self.fc(torch.cat([x, x], 1))


class _FunctionalGeluTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return F.gelu(self.fc(x), approximate="tanh")


class _ViewOther(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = F.avg_pool2d(x, 8)
        return self.fc(x.view(-1, 48))


class _AddScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(x) + 1.0


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.spare = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(x)


def test_unsupported_functions():
    _raises(_Mul(), "'mul'", "operator.mul", input_shape=(10,))
    _raises(_Cat(), "'cat'", "cat", input_shape=(10,))
    _raises(_FunctionalGeluTanh(), "'gelu'", "tanh", input_shape=(10,))
    _raises(_ViewOther(), "'view'", "view")
    _raises(_AddScalar(), "'add'", "not a tensor", input_shape=(10,))
    _raises(_Unused(), "spare", input_shape=(10,))


def test_shape_mismatch():
    net = _seq(conv=nn.Conv2d(3, 4, 3), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
               fc=nn.Linear(4, 10))
    _raises(net, "'conv'", "Conv2d", "[5, 32, 32]", input_shape=(5, 32, 32))
    # Linear on an unflattened input: PyTorch would apply it to the last axis, flatmin cannot
    _raises(_seq(fc=nn.Linear(32, 10)), "'fc'", "flatten", input_shape=(3, 32, 32))
    # PyTorch itself fails: the error names the module and the shape it received
    _raises(_seq(fc=nn.Linear(10, 10)), "'fc'", "Linear", "[3, 32, 32]", input_shape=(3, 32, 32))


def test_functional_forms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = F.max_pool2d(x, 2)
            y = F.avg_pool2d(x, kernel_size=2, stride=2)
            y = y + F.softplus(torch.sigmoid(torch.tanh(F.gelu(y))))
            y = torch.add(y, y.relu())
            y = F.adaptive_avg_pool2d(y, 1)
            y = y.reshape(y.shape[0], -1)
            return self.fc(y)

    net = export_torch.to_network(Net(), (3, 32, 32))
    types = [l["type"] for l in net["layers"]]
    assert types == ["Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "GELU", "Tanh", "Sigmoid",
                     "Softplus", "Add", "ReLU", "Add", "AdaptiveAvgPool2d", "Flatten",
                     "Linear"], types
    by = {l["name"]: l for l in net["layers"]}
    assert "input" not in by["gelu"]  # reads the layer before it
    assert by["relu_1"] == {"name": "relu_1", "type": "ReLU"}
    assert by["add"]["inputs"] == ["avg_pool2d", "softplus"]
    assert by["add_1"]["inputs"] == ["add", "relu_1"]
    assert by["max_pool2d"]["stride"] == 2


# ---------------------------------------------------------------------------------------------
# load_weights, command line


def test_load_weights_round_trip():
    for name, factory, seed in make_net_fixtures.CASES:
        src = make_net_fixtures.build(factory, seed).float()
        state = {k: v.contiguous() for k, v in src.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            save_file(state, path)
            torch.manual_seed(1234)
            fresh = factory()  # float32, other values
            assert export_torch.load_weights(fresh, path) is fresh
            for k, v in fresh.state_dict().items():
                assert v.dtype == state[k].dtype and torch.equal(v, state[k]), (name, k)
            fresh64 = factory().double()
            export_torch.load_weights(fresh64, path)
            for k, v in fresh64.state_dict().items():
                want = state[k].double() if state[k].is_floating_point() else state[k]
                assert v.dtype == want.dtype and torch.equal(v, want), (name, k)
            # missing and unexpected keys
            bad = dict(state)
            first = next(iter(bad))
            del bad[first]
            bad["extra.weight"] = torch.zeros(2)
            save_file(bad, path)
            try:
                export_torch.load_weights(factory(), path)
            except ValueError as e:
                assert first in str(e) and "extra.weight" in str(e), str(e)
            else:
                raise AssertionError("load_weights accepted missing/unexpected keys")


def test_command_line():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gelu.json")
        factory = os.path.join(HERE, "make_net_fixtures.py") + ":gelu_mlp"
        r = subprocess.run([sys.executable, os.path.join(HERE, "export_torch.py"), "--module",
                            factory, out, "--input-shape", "3,32,32"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        want = open(os.path.join(NETS, "gelu_mlp", "network.json"), encoding="utf-8").read()
        assert open(out, encoding="utf-8").read() == want


def _run_all():
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    failed = 0
    for n, f in tests:
        try:
            f()
            print(f"PASS {n}")
        except Exception as e:  # report and go on
            failed += 1
            print(f"FAIL {n}: {type(e).__name__}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_all())
