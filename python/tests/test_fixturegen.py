"""The numpy generator in fixturegen.py against the fixtures and tools/make_fixtures.py.

Needs neither flatmin nor torch: the pinned values of models/tests/golden.rs, the generator
bits, generated state statistics and batches stored in every golden fixture, and
make_fixtures.py's own generator functions (extracted from its source, which imports torch,
and run with numpy alone) on a few seeds and streams.
"""

import ast
import os

import numpy as np
import pytest

import fixturegen as fg

GOLDEN_CASES = ["tiny-tanh", "mlp-s", "cnn-s", "resnet20-train", "resnet20-eval",
                "resnet18-train", "resnet18-eval", "tiny-tanh-mse", "cnn-s-mse",
                "resnet20-eval-mse"]
BACKPACK_CASES = ["backpack-tiny-tanh", "backpack-cnn-s"]
MAKE_FIXTURES = os.path.join(fg.REPO, "tools", "make_fixtures.py")


def _reference_functions():
    """make_fixtures.py's generator functions and constants, executed without torch."""
    with open(MAKE_FIXTURES) as f:
        tree = ast.parse(f.read())
    keep_funcs = {"mix", "stream_key", "bits", "unit", "uniform", "make_batch", "sample_indices",
                  "put", "put_stats"}
    keep_consts = {"SAMPLES", "MEAN", "STD", "PIXEL_STREAM", "LABEL_STREAM", "DIR_STREAM", "U",
                   "GOLDEN"}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in keep_funcs:
            body.append(node)
        elif isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in keep_consts for t in node.targets):
            body.append(node)
    ns = {"np": np, "math": __import__("math")}
    exec(compile(ast.Module(body=body, type_ignores=[]), MAKE_FIXTURES, "exec"), ns)
    missing = (keep_funcs | keep_consts) - set(ns)
    assert not missing, f"make_fixtures.py no longer defines {sorted(missing)}"
    return ns


def test_pinned_values_of_golden_rs():
    assert [int(b) for b in fg.bits(1, 0, 2)] == [0x4DDE6A9327747019, 0x43C11D025EFD26E3]
    assert fg.uniform(7, 3, (3,), -1.0, 1.0).tolist() == [
        0.12335294532839836, -0.3705668378394986, -0.5876959470362089]
    assert fg.make_batch(5, 4)[1].tolist() == [4, 0, 5, 0]
    assert fg.sample_indices(4097)[:3].tolist() == [0, 1, 2]
    assert fg.sample_indices(10_000)[-1] == 9_999
    u = fg.uniform(7, 3, (1000,), -1.0, 1.0)
    assert ((u >= -1.0) & (u < 1.0)).all()


@pytest.mark.parametrize("seed,stream", [(0, 0), (1, 5), (1001, 1 << 32), (3002, (2 << 32) + 7),
                                         (2**64 - 1, 2**64 - 1), (12345, 2**63 + 11)])
def test_generator_matches_make_fixtures(seed, stream):
    ref = _reference_functions()
    np.testing.assert_array_equal(fg.bits(seed, stream, 257), ref["bits"](seed, stream, 257))
    a = fg.uniform(seed, stream, (4, 5, 3), -0.25, 0.75)
    b = ref["uniform"](seed, stream, (4, 5, 3), -0.25, 0.75)
    assert a.dtype == b.dtype == np.float64
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed,n", [(5, 4), (1004, 8), (3001, 3)])
def test_batch_matches_make_fixtures(seed, n):
    ref = _reference_functions()
    x, y = fg.make_batch(seed, n)
    rx, ry = ref["make_batch"](seed, n)
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.float64
    assert x.tobytes() == rx.tobytes()
    assert y.dtype == np.int64 and y.tolist() == ry.tolist()
    assert ((y >= 0) & (y < 10)).all()


def test_storage_matches_make_fixtures():
    ref = _reference_functions()
    for length in (4097, 5000, 123457):
        np.testing.assert_array_equal(fg.sample_indices(length), ref["sample_indices"](length))
    a = fg.uniform(9, 1, (70, 80), -2, 3)
    out = {}
    ref["put"](out, "t", a)
    st = fg.Stored("t", out["t.shape"], out["t.samples"], out["t.stats"])
    assert fg.rel_error(st, a) == 0.0
    assert fg.rel_error(st, a * (1 + 1e-6)) > 1e-7
    small = {}
    ref["put"](small, "s", a[:3])
    assert fg.rel_error(fg.Stored("s", small["s"].shape, small["s"]), a[:3]) == 0.0


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_generated_state_and_batch_match_golden_fixture(case):
    fx = fg.Fixture(case)
    seed, n = fx.seed, fx.batch
    assert fx.tensors["check.bits"].tolist() == fg.bits(seed, 0, 4).view(np.int64).tolist()
    entries = fx.state_order()
    assert fg.state_order_string(entries) == fx.meta["state_dict"]
    state = fg.generated_state(entries, seed)
    assert list(state) == [name for name, _ in entries]
    for name, shape in entries:
        t = state[name]
        assert t.shape == shape, name
        if name.endswith("num_batches_tracked"):
            assert t.dtype == np.int64 and (t == 0).all()
            continue
        want = fx.tensors[f"init.{name}"]
        got = fg.stats(t)
        err = [abs(got[0] - want[0]) / want[2], abs(got[1] - want[1]) / want[1],
               abs(got[2] - want[2]) / want[2]]
        assert max(err) <= 1e-12, f"{case}: generated {name}: {got} vs {want}"
    x, y = fg.make_batch(seed, n)
    st = fx.stored("input.x")
    assert st.shape == x.shape
    assert st.pick(x).tobytes() == st.values.tobytes()
    assert y.tolist() == fx.tensors["input.labels"].tolist()
    # trainable parameters: every state entry that is not a BatchNorm buffer
    params = [nm for nm, _, kind, _, _ in fg.entry_kinds(entries)
              if kind in ("weight", "bias") or (kind == "bn" and not nm.rsplit(".", 1)[1]
                                                .startswith("running_"))]
    assert params == fx.params()


@pytest.mark.parametrize("case", BACKPACK_CASES)
def test_batch_matches_backpack_fixture(case):
    fx = fg.Fixture(case)
    x, y = fg.make_batch(fx.seed, fx.batch)
    st = fx.stored("input.x")
    assert st.shape == x.shape
    assert st.pick(x).tobytes() == st.values.tobytes()
    assert y.tolist() == fx.tensors["input.labels"].tolist()
