"""Network files and PyTorch modules: flatmin.Net.load and flatmin.Net.from_torch.

The exported-network fixtures in models/tests/fixtures/nets/ (tools/make_net_fixtures.py:
network.json, a float64 state_dict, and PyTorch float64 references) must give PyTorch's logits,
loss, gradients and HVPs in BatchNorm train and eval mode and the exact trace (total and per
tensor) in eval mode, to 1e-8 relative, as models/tests/exported.rs checks them. The
from_torch tests need torch and are skipped (visibly) without it.
"""

import copy
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import flatmin
import fixturegen as fg

TOL = 1e-8
CASES = ["gelu_mlp", "small_resnet", "vgg_bn"]
DIMS = {"vgg_bn": 4450, "gelu_mlp": 7562, "small_resnet": 8754}
HAS_BN = {"vgg_bn": True, "gelu_mlp": False, "small_resnet": True}


def max_abs(a):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def scaled_error(got, want, floor=0.0):
    """max |got - want| / max(max |want|, floor), as exported.rs's check_scaled."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if np.isnan(got).any():
        return np.inf
    scale = max(max_abs(want), floor, 1e-300)
    return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


def load_case(name):
    folder = os.path.join(fg.NET_FIXTURES, name)
    net = flatmin.Net.load(os.path.join(folder, "network.json"))
    weights = load_file(os.path.join(folder, "weights.safetensors"))
    net.load_state_dict(weights)
    case = load_file(os.path.join(folder, "case.safetensors"))
    return net, weights, case


def test_all_cases_present():
    found = sorted(d for d in os.listdir(fg.NET_FIXTURES)
                   if os.path.isfile(os.path.join(fg.NET_FIXTURES, d, "network.json")))
    assert found == CASES


@pytest.mark.parametrize("name", CASES)
def test_load_and_state_dict(name):
    net, weights, case = load_case(name)
    assert tuple(net.input_shape) == (3, 32, 32)
    assert net.num_params == DIMS[name]
    sd = net.state_dict()
    assert set(sd) == set(weights)
    for k, w in weights.items():
        assert sd[k].shape == w.shape, k
        if k.endswith("num_batches_tracked"):
            assert sd[k].dtype == np.int64 and np.array_equal(sd[k], w), k
        else:
            assert sd[k].dtype == np.float64 and np.array_equal(sd[k], w), k
    params = [k[len("v."):] for k in case if k.startswith("v.")]
    assert sorted(net.param_names) == sorted(params)
    # param_names follow state_dict order and skip the BatchNorm buffers
    order = [k for k in sd if k in set(params)]
    assert list(net.param_names) == order
    assert sum(int(np.prod(sd[n].shape)) for n in net.param_names) == net.num_params
    assert any(k.endswith("running_var") for k in sd) == HAS_BN[name]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", CASES)
def test_hvp_matches_pytorch(name, mode):
    net, _, case = load_case(name)
    x, y = case["x"], case["y"]
    v = {n: case[f"v.{n}"] for n in net.param_names}
    out = net.hvp(x, y, v, dtype="f64", bn_mode=mode)
    errors = {
        "logits": scaled_error(out["logits"], case[f"{mode}.logits"]),
        "loss": scaled_error(np.array([out["loss"]]), case[f"{mode}.loss"]),
    }
    g_max = max(max_abs(case[f"{mode}.grad.{n}"]) for n in net.param_names)
    h_max = max(max_abs(case[f"{mode}.hvp.{n}"]) for n in net.param_names)
    for n in net.param_names:
        errors[f"grad {n}"] = scaled_error(out["grad"][n], case[f"{mode}.grad.{n}"], g_max)
        errors[f"hvp {n}"] = scaled_error(out["hvp"][n], case[f"{mode}.hvp.{n}"], h_max)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"{name} {mode}: relative errors above {TOL:g}: {bad}"


@pytest.mark.parametrize("name", CASES)
def test_exact_trace_matches_pytorch(name):
    net, _, case = load_case(name)
    r = net.trace(case["x"], case["y"], method="exact", dtype="f64", bn_mode="eval",
                  per_layer=True)
    want = float(case["eval.trace"][0])
    assert abs(r["trace"] - want) <= TOL * abs(want), (r["trace"], want)
    assert r["exact"] is True and r["num_params"] == DIMS[name]
    for n in net.param_names:
        w = float(case[f"eval.trace.{n}"][0])
        got = r["layers"][n]["trace"]
        assert abs(got - w) <= TOL * max(abs(w), 1e-12 * abs(r["trace"])), (n, got, w)


def test_gelu_mlp_bn_modes_coincide():
    """No BatchNorm: train and eval mode give the same numbers."""
    net, _, case = load_case("gelu_mlp")
    v = {n: case[f"v.{n}"] for n in net.param_names}
    a = net.hvp(case["x"], case["y"], v, bn_mode="train")
    b = net.hvp(case["x"], case["y"], v, bn_mode="eval")
    assert a["loss"] == b["loss"]
    for n in net.param_names:
        assert np.array_equal(a["hvp"][n], b["hvp"][n]), n


# ---------------------------------------------------------------------------------------------
# from_torch (needs torch)


def _small_cnn(torch):
    nn = torch.nn
    F = torch.nn.functional

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 16), nn.Tanh(),
                                      nn.Linear(16, 10))

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
            x = F.gelu(self.conv2(x))
            return self.head(x)

    return SmallCNN


def _pooled_mlp(torch):
    nn = torch.nn
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 24), nn.Softplus(),
                         nn.Linear(24, 10))


def _torch_module(torch, dtype, kind="cnn_bn"):
    """A small module with non-trivial state: "cnn_bn" (conv, BatchNorm with moved running
    statistics, max pool, GELU, nested Sequential head) or "mlp" (no BatchNorm)."""
    torch.manual_seed(0)
    m = (_small_cnn(torch)() if kind == "cnn_bn" else _pooled_mlp(torch)).to(dtype)
    if kind == "cnn_bn":
        with torch.no_grad():
            m.bn1.weight.uniform_(0.5, 1.5)
            m.bn1.bias.uniform_(-0.2, 0.2)
            m.train()
            for _ in range(2):
                m(torch.randn(4, 3, 32, 32, dtype=dtype))
    m.eval()
    return m


def _torch_refs(torch, module, x, y, v):
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    logits = module(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
    dot = sum((g * v[n]).sum() for (n, _), g in zip(params, grads))
    hvps = torch.autograd.grad(dot, [p for _, p in params])
    return (logits.detach().numpy(), float(loss.detach()),
            {n: g.detach().numpy() for (n, _), g in zip(params, grads)},
            {n: h.detach().numpy() for (n, _), h in zip(params, hvps)})


@pytest.mark.parametrize("kind,mode", [("cnn_bn", "train"), ("cnn_bn", "eval"), ("mlp", "eval")])
def test_from_torch_matches_double_backward(kind, mode):
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, torch.float64, kind)
    net = flatmin.Net.from_torch(module, input_shape=(3, 32, 32))
    assert tuple(net.input_shape) == (3, 32, 32)
    sd = net.state_dict()
    tsd = module.state_dict()
    assert list(sd) == list(tsd)
    for k, t in tsd.items():
        assert np.array_equal(sd[k], t.numpy()), k
    assert list(net.param_names) == [n for n, _ in module.named_parameters()]
    assert net.num_params == sum(p.numel() for p in module.parameters())

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    v = {n: torch.rand(p.shape, dtype=torch.float64, generator=g) * 2 - 1
         for n, p in module.named_parameters()}
    ref_module = copy.deepcopy(module)
    ref_module.train(mode == "train")
    logits, loss, grads, hvps = _torch_refs(torch, ref_module, x, y, v)

    out = net.hvp(x.numpy(), y.numpy(), {n: t.numpy() for n, t in v.items()}, dtype="f64",
                  bn_mode=mode)
    assert scaled_error(out["logits"], logits) <= TOL
    assert abs(out["loss"] - loss) <= TOL * abs(loss)
    g_max = max(max_abs(a) for a in grads.values())
    h_max = max(max_abs(a) for a in hvps.values())
    for n in net.param_names:
        assert scaled_error(out["grad"][n], grads[n], g_max) <= TOL, n
        assert scaled_error(out["hvp"][n], hvps[n], h_max) <= TOL, n
    # the module itself is left as it was (eval mode, same state)
    assert not module.training
    for k, t in module.state_dict().items():
        assert torch.equal(t, tsd[k]), k
    # torch tensors are accepted wherever arrays are, with the same result
    out_t = net.hvp(x, y, v, dtype="f64", bn_mode=mode)
    assert out_t["loss"] == out["loss"]
    for n in net.param_names:
        assert np.array_equal(out_t["hvp"][n], out["hvp"][n]), n


@pytest.mark.parametrize("kind", ["cnn_bn", "mlp"])
def test_from_torch_float32_module_and_torch_state_dict(kind):
    torch = pytest.importorskip("torch")
    module = _torch_module(torch, torch.float32, kind)
    net = flatmin.Net.from_torch(module, input_shape=(3, 32, 32))
    sd = net.state_dict()
    for k, t in module.state_dict().items():
        want = t.numpy().astype(np.float64) if t.is_floating_point() else t.numpy()
        assert sd[k].dtype == want.dtype and np.array_equal(sd[k], want), k
    # load_state_dict takes torch tensors directly
    net.load_state_dict({k: t.double() if t.is_floating_point() else t
                         for k, t in module.state_dict().items()})
    assert all(np.array_equal(net.state_dict()[k], sd[k]) for k in sd)
