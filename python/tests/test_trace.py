"""flatmin.Net.trace / eigenvalues / density.

The exact trace (total and per tensor) against BackPACK's exact Hessian diagonal in the
backpack-tiny-tanh and backpack-cnn-s fixtures (generated weights and images, float64) to 1e-8
relative; the estimators (Hutchinson, Hutch++, auto) give finite, seeded, reproducible
estimates with standard errors; Lanczos eigenvalues agree with Rayleigh quotients computed from
hvp; the spectral density is a normalized density on its grid.
"""

import math

import numpy as np
import pytest

import flatmin
import fixturegen as fg

TOL = 1e-8

# the name a result reports for a requested method: flatmin reports the engine's names
# ("basis" for exact-hvp, "hutch++" for hutchpp), which it also accepts as method=
REPORTED = {"structural": ("structural",), "exact-hvp": ("exact-hvp", "basis"),
            "hutchinson": ("hutchinson",), "hutchpp": ("hutchpp", "hutch++")}
EXACT_METHODS = REPORTED["structural"] + REPORTED["exact-hvp"]
ALL_METHODS = sum(REPORTED.values(), ())

TRACE_KEYS = {"trace", "normalized_trace", "std_error", "method", "requested_method", "exact",
              "num_params", "samples", "bn_mode", "dtype", "seed", "seconds"}


def backpack_setup(case, preset):
    fx = fg.Fixture(case)
    assert fx.meta["model"] == preset
    assert "DiagHessian" in fx.meta["method"]
    net = flatmin.Net.preset(preset, seed=0)
    assert list(net.param_names) == fx.params()
    fg.load_generated(net, fx.seed)
    x, y = fg.make_batch(fx.seed, fx.batch)
    assert y.tolist() == fx.tensors["input.labels"].tolist()
    st = fx.stored("input.x")
    assert st.pick(x).tobytes() == st.values.tobytes()
    return fx, net, x, y


_TINY = {}


def tiny():
    """tiny-tanh with the backpack-tiny-tanh weights and batch (N = 32), built once."""
    if not _TINY:
        fx, net, x, y = backpack_setup("backpack-tiny-tanh", "tiny-tanh")
        _TINY.update(fx=fx, net=net, x=x, y=y)
    return _TINY["fx"], _TINY["net"], _TINY["x"], _TINY["y"]


@pytest.mark.parametrize("case,preset", [("backpack-tiny-tanh", "tiny-tanh"),
                                         ("backpack-cnn-s", "cnn-s")])
def test_exact_trace_matches_backpack(case, preset):
    fx, net, x, y = backpack_setup(case, preset)
    r = net.trace(x, y, method="exact", dtype="f64", bn_mode="eval", per_layer=True)
    assert TRACE_KEYS <= set(r), sorted(TRACE_KEYS - set(r))
    want = float(fx.tensors["trace"][0])
    assert abs(r["trace"] - want) <= TOL * abs(want), (r["trace"], want)
    assert r["exact"] is True
    assert r["requested_method"] == "exact"
    assert r["method"] in EXACT_METHODS, r["method"]
    assert r["num_params"] == net.num_params
    for alias in ("dim", "stderr", "compute_s"):
        assert alias not in r, f"one key per quantity: {alias}"
    assert r["dtype"] == "f64" and r["bn_mode"] == "eval"
    assert r["samples"] == len(y), f"samples {r['samples']} (number of images {len(y)}?)"
    assert math.isclose(r["normalized_trace"], r["trace"] / r["num_params"], rel_tol=1e-12)
    se = r["std_error"]
    assert se is None or se == 0 or math.isnan(se), f"exact trace with std_error {se}"
    assert r["seconds"] >= 0
    # per tensor
    layers = r["layers"]
    assert list(layers) == list(net.param_names)
    total = 0.0
    numel = 0
    for name in net.param_names:
        t = layers[name]
        w = float(fx.tensors[f"trace.{name}"][0])
        assert abs(t["trace"] - w) <= TOL * max(abs(w), 1e-12 * abs(want)), (name, t["trace"], w)
        assert t["numel"] == int(np.prod(net.state_dict()[name].shape)), name
        assert math.isclose(t["normalized_trace"], t["trace"] / t["numel"], rel_tol=1e-12)
        total += t["trace"]
        numel += t["numel"]
    assert numel == net.num_params
    assert abs(total - r["trace"]) <= 1e-12 * abs(r["trace"]) * len(layers)
    # the loss of the same model and batch is BackPACK's
    loss = net.hvp(x, y, None, dtype="f64", bn_mode="eval")["loss"]
    assert abs(loss - fx.tensors["loss"][0]) <= 1e-12 * abs(fx.tensors["loss"][0])


@pytest.mark.parametrize("case,preset", [("backpack-tiny-tanh", "tiny-tanh"),
                                         ("backpack-cnn-s", "cnn-s")])
def test_exact_diagonal_matches_backpack(case, preset):
    """trace(..., diagonal=True): the exact Hessian diagonal, named like the parameters."""
    fx, net, x, y = backpack_setup(case, preset)
    r = net.trace(x, y, method="exact", dtype="f64", bn_mode="eval", diagonal=True)
    diag = r["diagonal"]
    assert list(diag) == list(net.param_names)
    for name in net.param_names:
        d = np.asarray(diag[name])
        assert d.shape == net.state_dict()[name].shape, name
        err = fg.rel_error(fx.stored(f"diag.{name}"), d)
        assert err <= TOL, f"{case} diag.{name}: relative error {err:.2e}"
        assert abs(d.sum() - fx.tensors[f"trace.{name}"][0]) <= TOL * abs(fx.tensors["trace"][0])


def test_per_layer_false_has_no_layers():
    fx, net, x, y = tiny()
    r = net.trace(x, y, method="exact", dtype="f64", bn_mode="eval")
    assert "layers" not in r or r["layers"] is None
    assert abs(r["trace"] - fx.tensors["trace"][0]) <= TOL * abs(fx.tensors["trace"][0])


def test_structural_and_basis_hvp_traces_agree():
    """tiny-tanh (d = 6506): method="structural" and method="exact-hvp" (one HVP per basis
    vector) both give BackPACK's trace."""
    fx, net, x, y = tiny()
    want = float(fx.tensors["trace"][0])
    s = net.trace(x, y, method="structural", dtype="f64", bn_mode="eval", per_layer=True)
    b = net.trace(x, y, method="exact-hvp", dtype="f64", bn_mode="eval", per_layer=True)
    assert s["method"] in REPORTED["structural"] and b["method"] in REPORTED["exact-hvp"]
    assert s["exact"] and b["exact"]
    for r in (s, b):
        assert abs(r["trace"] - want) <= TOL * abs(want), (r["method"], r["trace"], want)
        for name in net.param_names:
            w = float(fx.tensors[f"trace.{name}"][0])
            got = r["layers"][name]["trace"]
            assert abs(got - w) <= TOL * max(abs(w), 1e-12 * abs(want)), (r["method"], name)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_stochastic_estimates(method):
    fx, net, x, y = tiny()
    exact = float(fx.tensors["trace"][0])
    r = net.trace(x, y, method=method, dtype="f64", bn_mode="eval", probes=16, seed=3)
    assert TRACE_KEYS <= set(r)
    assert r["method"] in REPORTED[method] and r["requested_method"] == method
    assert r["exact"] is False
    assert r["seed"] == 3
    assert math.isfinite(r["trace"]) and math.isfinite(r["std_error"])
    assert r["std_error"] > 0
    assert r["num_params"] == net.num_params
    assert math.isclose(r["normalized_trace"], r["trace"] / r["num_params"], rel_tol=1e-12)
    # a seeded estimate: within a generous number of standard errors of the exact trace
    assert abs(r["trace"] - exact) <= 8 * r["std_error"] + 1e-9 * abs(exact), (r, exact)
    # reproducible for the same seed, different for another
    again = net.trace(x, y, method=method, dtype="f64", bn_mode="eval", probes=16, seed=3)
    assert again["trace"] == r["trace"] and again["std_error"] == r["std_error"]
    other = net.trace(x, y, method=method, dtype="f64", bn_mode="eval", probes=16, seed=4)
    assert other["trace"] != r["trace"]


@pytest.mark.parametrize("method", ["exact-hvp", "hutchpp"])
def test_reported_method_is_accepted_back(method):
    """The reported method name, passed back as method=, gives the same result."""
    fx, net, x, y = tiny()
    a = net.trace(x, y, method=method, dtype="f64", bn_mode="eval", probes=8, seed=1)
    b = net.trace(x, y, method=a["method"], dtype="f64", bn_mode="eval", probes=8, seed=1)
    assert b["method"] == a["method"] and b["trace"] == a["trace"]


def test_hutchinson_per_layer():
    fx, net, x, y = tiny()
    r = net.trace(x, y, method="hutchinson", dtype="f64", bn_mode="eval", probes=8, seed=0,
                  per_layer=True)
    assert list(r["layers"]) == list(net.param_names)
    for name, t in r["layers"].items():
        assert math.isfinite(t["trace"]) and math.isfinite(t["std_error"]), name
    total = sum(t["trace"] for t in r["layers"].values())
    assert abs(total - r["trace"]) <= 1e-9 * max(1.0, abs(r["trace"]))


def test_auto_method():
    fx, net, x, y = tiny()
    r = net.trace(x, y, method="auto", dtype="f64", bn_mode="eval")
    assert r["requested_method"] == "auto"
    assert r["method"] in ALL_METHODS, r["method"]
    assert math.isfinite(r["trace"])
    if r["exact"]:
        want = float(fx.tensors["trace"][0])
        assert abs(r["trace"] - want) <= TOL * abs(want)


def test_trace_with_batch_iterator():
    """Two halves of the batch give the exact trace of the mean loss over all images."""
    fx, net, x, y = tiny()
    want = float(fx.tensors["trace"][0])
    r = net.trace([(x[:16], y[:16]), (x[16:], y[16:])], None, method="exact", dtype="f64",
                  bn_mode="eval")
    assert abs(r["trace"] - want) <= TOL * abs(want)


def _dot(a, b):
    return sum(float(np.sum(np.asarray(a[k], dtype=np.float64) * np.asarray(b[k]))) for k in a)


def test_eigenvalues_and_rayleigh_quotients():
    fx, net, x, y = tiny()
    r = net.eigenvalues(x, y, k=2, steps=100, eigenvectors=True, dtype="f64", bn_mode="eval",
                        seed=0)
    lam = np.asarray(r["eigenvalues"])
    res = np.asarray(r["residuals"])
    assert lam.shape == (2,) and res.shape == (2,)
    assert np.isfinite(lam).all() and np.isfinite(res).all()
    assert lam[0] >= lam[1]
    assert isinstance(r["iterations"], int) and 0 < r["iterations"] <= 100
    assert isinstance(r["converged"], bool)
    vecs = r["eigenvectors"]
    assert len(vecs) == 2
    for k, vec in enumerate(vecs):
        assert list(vec) == list(net.param_names)
        hv = net.hvp(x, y, vec, dtype="f64", bn_mode="eval")["hvp"]
        q = _dot(vec, hv) / _dot(vec, vec)
        assert abs(q - lam[k]) <= 1e-6 * abs(lam[0]), (k, q, lam[k])
    # unit, orthogonal eigenvectors
    assert abs(_dot(vecs[0], vecs[0]) - 1) < 1e-8
    assert abs(_dot(vecs[0], vecs[1])) < 1e-6
    # the top eigenvalue bounds every Rayleigh quotient
    for s in range(3):
        v = fg.net_directions(net, 77, stream_offset=1000 * s)
        hv = net.hvp(x, y, v, dtype="f64", bn_mode="eval")["hvp"]
        q = _dot(v, hv) / _dot(v, v)
        assert q <= lam[0] * (1 + 1e-6), (q, lam[0])
    # without eigenvectors: the same eigenvalues, no vectors
    r2 = net.eigenvalues(x, y, k=2, steps=100, dtype="f64", bn_mode="eval", seed=0)
    assert "eigenvectors" not in r2 or r2["eigenvectors"] is None
    np.testing.assert_array_equal(np.asarray(r2["eigenvalues"]), lam)


def test_density_is_normalized():
    fx, net, x, y = tiny()
    r = net.density(x, y, probes=4, steps=32, points=400, dtype="f64", bn_mode="eval", seed=0)
    grid, dens = np.asarray(r["grid"]), np.asarray(r["density"])
    assert grid.shape == dens.shape == (400,)
    assert np.all(np.diff(grid) > 0)
    assert np.isfinite(dens).all() and (dens >= 0).all()
    integral = float(np.sum((dens[1:] + dens[:-1]) * np.diff(grid)) / 2)
    assert abs(integral - 1.0) < 0.05, integral
    nodes, weights = np.asarray(r["nodes"]), np.asarray(r["weights"])
    assert nodes.shape == weights.shape and nodes.size > 0
    assert np.isfinite(nodes).all() and (weights >= 0).all()
    assert math.isfinite(r["trace"]) and math.isfinite(r["std_error"])
    # SLQ's trace estimate is in the right range (generous: 4 probes)
    exact = float(fx.tensors["trace"][0])
    assert abs(r["trace"] - exact) <= 8 * r["std_error"] + 0.5 * abs(exact)
