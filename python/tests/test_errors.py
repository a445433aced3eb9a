"""Bad arguments raise ValueError naming the argument; state and results are reproducible.

Unknown presets / methods / dtypes / BatchNorm modes, malformed x, y and v, and bad
state_dicts must raise ValueError whose message names what is wrong; a missing network file
raises OSError or ValueError naming the path. load_state_dict(state_dict()) changes no bit of
any result, and the same call twice gives bit-identical results.
"""

import os
import re

import numpy as np
import pytest

import flatmin
import fixturegen as fg

PRESETS = ["tiny-tanh", "mlp-s", "cnn-s", "resnet20", "resnet18"]
PRESET_CASE = {"tiny-tanh": "tiny-tanh", "mlp-s": "mlp-s", "cnn-s": "cnn-s",
               "resnet20": "resnet20-eval", "resnet18": "resnet18-eval"}


def small(preset="tiny-tanh", n=4, seed=11):
    net = flatmin.Net.preset(preset, seed=0)
    fg.load_generated(net, seed)
    x, y = fg.make_batch(seed, n)
    v = fg.net_directions(net, seed)
    return net, x, y, v


def same(a, b):
    """Bit-identical hvp results."""
    assert set(a) == set(b)
    assert np.float64(a["loss"]).tobytes() == np.float64(b["loss"]).tobytes()
    assert a["logits"].tobytes() == b["logits"].tobytes()
    for name in a["grad"]:
        assert a["grad"][name].tobytes() == b["grad"][name].tobytes(), name
    hv_a = a.get("hvp") or {}
    hv_b = b.get("hvp") or {}
    for name in hv_a:
        assert hv_a[name].tobytes() == hv_b[name].tobytes(), name


# ---------------------------------------------------------------------------------------------
# presets and basic properties


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_pytorch_layout(preset):
    net = flatmin.Net.preset(preset, seed=0)
    fx = fg.Fixture(PRESET_CASE[preset])
    assert fg.net_entries(net) == fx.state_order()
    assert list(net.param_names) == fx.params()
    shapes = dict(fx.state_order())
    assert net.num_params == sum(int(np.prod(shapes[n])) for n in net.param_names)
    assert tuple(net.input_shape) == (3, 32, 32)
    for name, a in net.state_dict().items():
        want = np.int64 if name.endswith("num_batches_tracked") else np.float64
        assert isinstance(a, np.ndarray) and a.dtype == want, (name, a.dtype)


def test_preset_seed():
    a = flatmin.Net.preset("tiny-tanh", seed=0).state_dict()
    b = flatmin.Net.preset("tiny-tanh", seed=0).state_dict()
    c = flatmin.Net.preset("tiny-tanh", seed=1).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_unknown_preset():
    with pytest.raises(ValueError, match="no-such-net"):
        flatmin.Net.preset("no-such-net", seed=0)


def test_missing_network_file(tmp_path):
    path = str(tmp_path / "missing" / "network.json")
    with pytest.raises((OSError, ValueError), match=re.escape(path)):
        flatmin.Net.load(path)


def test_bad_network_file(tmp_path):
    path = tmp_path / "network.json"
    path.write_text('{"flatmin_network": 1, "input": [3, 32, 32], "layers": [{"name": "a"}]}')
    with pytest.raises(ValueError):
        flatmin.Net.load(str(path))


# ---------------------------------------------------------------------------------------------
# x, y


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 3072), (3, 32, 32), (4, 1, 32, 32)])
def test_wrong_x_shape(shape):
    net, x, y, v = small()
    with pytest.raises(ValueError, match=r"\bx\b"):
        net.hvp(np.zeros(shape), y, v)


def test_y_length_mismatch():
    net, x, y, v = small()
    with pytest.raises(ValueError, match=r"\by\b"):
        net.hvp(x, y[:3], v)


@pytest.mark.parametrize("bad", [10, -1])
def test_label_out_of_range(bad):
    net, x, y, v = small()
    y = y.copy()
    y[2] = bad
    with pytest.raises(ValueError, match=r"\by\b|label"):
        net.hvp(x, y, v)
    with pytest.raises(ValueError, match=r"\by\b|label"):
        net.trace(x, y, method="hutchinson", probes=2)


def test_int32_labels_are_accepted():
    """y is "an int array": int32 labels give the same result as int64."""
    net, x, y, v = small()
    a = net.hvp(x, y, v)
    b = net.hvp(x, y.astype(np.int32), v)
    same(a, b)


def test_bad_batch_in_iterator():
    net, x, y, v = small()
    with pytest.raises(ValueError):
        net.hvp([(x[:2], y[:2]), (x[2:], y[2:3])], None, v)


# ---------------------------------------------------------------------------------------------
# v


def test_unknown_param_in_v():
    net, x, y, v = small()
    v["bogus.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=re.escape("bogus.weight")):
        net.hvp(x, y, v)


def test_missing_param_in_v():
    net, x, y, v = small()
    name = net.param_names[-1]
    del v[name]
    with pytest.raises(ValueError, match=re.escape(name)):
        net.hvp(x, y, v)


def test_wrong_shape_in_v():
    net, x, y, v = small()
    name = net.param_names[0]
    v[name] = v[name].reshape(-1)
    with pytest.raises(ValueError, match=re.escape(name)):
        net.hvp(x, y, v)


def test_nan_in_v():
    net, x, y, v = small()
    name = net.param_names[1]
    v[name] = v[name].copy()
    v[name].reshape(-1)[0] = np.nan
    with pytest.raises(ValueError, match=r"(?i)nan|finite"):
        net.hvp(x, y, v)


def test_nan_in_second_direction_of_a_list():
    net, x, y, v = small()
    w = {k: a.copy() for k, a in v.items()}
    w[net.param_names[0]].reshape(-1)[-1] = np.inf
    with pytest.raises(ValueError, match=r"(?i)nan|finite|inf"):
        net.hvp(x, y, [v, w])


# ---------------------------------------------------------------------------------------------
# method, dtype, bn_mode


def test_unknown_method():
    net, x, y, v = small()
    with pytest.raises(ValueError, match="method"):
        net.trace(x, y, method="bogus-method")


def test_fewer_lanczos_steps_than_eigenvalues():
    net, x, y, v = small()
    with pytest.raises(ValueError, match="steps"):
        net.eigenvalues(x, y, k=3, steps=2)
    with pytest.raises(ValueError, match="k"):
        net.eigenvalues(x, y, k=0)


@pytest.mark.parametrize("call", ["hvp", "trace", "eigenvalues", "density"])
def test_bad_dtype(call):
    net, x, y, v = small()
    args = (x, y, v) if call == "hvp" else (x, y)
    with pytest.raises(ValueError, match="dtype"):
        getattr(net, call)(*args, dtype="f16")


@pytest.mark.parametrize("call", ["hvp", "trace", "eigenvalues", "density"])
def test_bad_bn_mode(call):
    net, x, y, v = small()
    args = (x, y, v) if call == "hvp" else (x, y)
    with pytest.raises(ValueError, match="bn_mode"):
        getattr(net, call)(*args, bn_mode="sometimes")


# ---------------------------------------------------------------------------------------------
# load_state_dict


def test_load_state_dict_wrong_shape():
    net = flatmin.Net.preset("tiny-tanh", seed=0)
    sd = net.state_dict()
    name = net.param_names[0]
    sd[name] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=re.escape(name)):
        net.load_state_dict(sd)


def test_load_state_dict_unknown_name():
    net = flatmin.Net.preset("tiny-tanh", seed=0)
    sd = net.state_dict()
    sd["layers.9.weight"] = np.zeros((10, 32))
    with pytest.raises(ValueError, match=re.escape("layers.9.weight")):
        net.load_state_dict(sd)


def test_load_state_dict_missing_name():
    net = flatmin.Net.preset("resnet20", seed=0)
    sd = net.state_dict()
    name = "layer2.0.bn1.running_var"
    assert name in sd
    del sd[name]
    with pytest.raises(ValueError, match=re.escape(name)):
        net.load_state_dict(sd)


def test_failed_load_leaves_state_unchanged():
    net = flatmin.Net.preset("tiny-tanh", seed=0)
    before = net.state_dict()
    sd = fg.generated_state(fg.net_entries(net), 5)
    sd[net.param_names[-1]] = np.zeros((7,))
    with pytest.raises(ValueError):
        net.load_state_dict(sd)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# reproducibility


@pytest.mark.parametrize("preset,bn", [("cnn-s", "eval"), ("resnet20", "train"),
                                       ("resnet20", "eval")])
def test_state_dict_round_trip_is_bit_identical(preset, bn):
    net, x, y, v = small(preset, n=2)
    a = net.hvp(x, y, v, dtype="f64", bn_mode=bn)
    sd = net.state_dict()
    net.load_state_dict(sd)
    again = net.state_dict()
    assert list(again) == list(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and again[k].tobytes() == sd[k].tobytes(), k
    b = net.hvp(x, y, v, dtype="f64", bn_mode=bn)
    same(a, b)
    # into a fresh net of the same preset
    other = flatmin.Net.preset(preset, seed=3)
    other.load_state_dict(sd)
    same(a, other.hvp(x, y, v, dtype="f64", bn_mode=bn))


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_same_call_twice_is_bit_identical(dtype):
    net, x, y, v = small("resnet20", n=2)
    same(net.hvp(x, y, v, dtype=dtype, bn_mode="train"),
         net.hvp(x, y, v, dtype=dtype, bn_mode="train"))
    t1 = net.trace(x, y, method="hutchinson", probes=2, dtype=dtype, seed=1)
    t2 = net.trace(x, y, method="hutchinson", probes=2, dtype=dtype, seed=1)
    assert t1["trace"] == t2["trace"] and t1["std_error"] == t2["std_error"]


def test_hvp_does_not_change_state():
    """hvp in train mode does not fold batch statistics into the running statistics."""
    net, x, y, v = small("resnet20", n=2)
    before = net.state_dict()
    net.hvp(x, y, v, dtype="f64", bn_mode="train")
    after = net.state_dict()
    for k in before:
        assert before[k].tobytes() == after[k].tobytes(), k


def test_thread_count_does_not_change_bits():
    """Results are bit-identical for any number of worker threads (set_num_threads)."""
    net, x, y, v = small("cnn-s", n=4)
    before = flatmin.num_threads()
    try:
        flatmin.set_num_threads(1)
        assert flatmin.num_threads() == 1
        one = net.hvp(x, y, v, dtype="f64")
        t_one = net.trace(x, y, method="exact", per_layer=True)
        flatmin.set_num_threads(3)
        assert flatmin.num_threads() == 3
        three = net.hvp(x, y, v, dtype="f64")
        t_three = net.trace(x, y, method="exact", per_layer=True)
    finally:
        flatmin.set_num_threads(None)
    same(one, three)
    assert t_one["trace"] == t_three["trace"]
    assert flatmin.num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        flatmin.set_num_threads(0)


def test_concurrent_calls_from_python_threads():
    """The engine runs without the GIL: calls from several Python threads on one net give the
    results of sequential calls."""
    from concurrent.futures import ThreadPoolExecutor

    net, x, y, v = small("cnn-s", n=4)
    want = net.hvp(x, y, v, dtype="f64")
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: net.hvp(x, y, v, dtype="f64"), range(6)))
    for r in results:
        same(want, r)
