"""Export a PyTorch module to a flatmin network file (docs/network-file.md).

A network file is JSON: the shape of one input sample and the layers in execution order, each
named like its PyTorch module so that the module's `state_dict()` (saved with
`safetensors.torch.save_file`) is flatmin's weights file as is.

Use from Python (with `tools/` on `sys.path`):

    import export_torch
    export_torch.export(model, "my_net.json", input_shape=(3, 32, 32))
    safetensors.torch.save_file(model.state_dict(), "my_net.safetensors")
    ...
    export_torch.load_weights(model, "runs/my-net/model.safetensors")  # a flatmin run's weights

or from the command line (the factory is any callable returning the module):

    python tools/export_torch.py --module mypkg.models:make_net my_net.json
    python tools/export_torch.py --module path/to/models.py:make_net my_net.json \\
        --input-shape 3,32,32 --weights-out my_net.safetensors

The module is traced with `torch.fx.symbolic_trace`. Supported: nn.Conv2d, nn.BatchNorm2d,
nn.Linear, nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Softplus, nn.MaxPool2d, nn.AvgPool2d,
nn.AdaptiveAvgPool2d(1), nn.Flatten, nn.Identity, nested nn.Sequential and fx-traceable custom
modules; the functional forms F.relu / torch.relu / Tensor.relu, torch.tanh, torch.sigmoid,
F.gelu, F.softplus, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d(x, 1),
torch.flatten(x, 1), Tensor.flatten(1), `x.view(x.size(0), -1)` / `x.reshape(x.size(0), -1)`;
and residual additions of two tensors (`+`, `+=`, torch.add, Tensor.add). Anything else is an
`ExportError` (a `ValueError`) naming the module path and type, or the fx node and its target.

Layer names: a module's layer is named by its qualified module path (the state_dict prefix,
e.g. `layer1.0.conv1`); any other layer (functional calls, additions, a second call of a
parameter-free module) by its fx node name (`relu`, `add_1`, ...), made unique. A layer states
`input` (one name) or `inputs` (Add, always) only where it does not read the layer just before
it; the network input is `input`.
"""

import argparse
import importlib
import importlib.util
import json
import operator
import os
import sys

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1

__all__ = ["ExportError", "export", "to_network", "network_json", "load_weights", "main"]


class ExportError(ValueError):
    """A module, function or value the network file format cannot express."""


# ---------------------------------------------------------------------------------------------
# helpers


def _square(value, what, where):
    """An int from an int or a pair of equal ints; anything else is an ExportError."""
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
            return int(value[0])
        if len(value) == 1 and isinstance(value[0], int):
            return int(value[0])
        raise ExportError(f"{where}: {what} {tuple(value)!r} is not square (a pair of equal "
                          f"integers); flatmin supports square {what}s only")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExportError(f"{where}: {what} {value!r} is not an integer")
    return int(value)


def _mod_where(path, module):
    return f"module '{path}' ({type(module).__name__})"


def _bind(where, names, defaults, args, kwargs):
    """Binds fx node args/kwargs to a positional parameter list (our own, explicit signature)."""
    if len(args) > len(names):
        raise ExportError(f"{where}: too many arguments ({len(args)})")
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise ExportError(f"{where}: unsupported keyword argument '{k}'")
        if k in bound:
            raise ExportError(f"{where}: argument '{k}' given twice")
        bound[k] = v
    for k in names:
        if k not in bound:
            if k not in defaults:
                raise ExportError(f"{where}: missing argument '{k}'")
            bound[k] = defaults[k]
    return bound


# ---------------------------------------------------------------------------------------------
# modules -> layer dicts (type and constructor arguments)


def _conv2d(path, m):
    w = _mod_where(path, m)
    if m.groups != 1:
        raise ExportError(f"{w}: groups={m.groups} is not supported (groups 1 only)")
    if _square(m.dilation, "dilation", w) != 1:
        raise ExportError(f"{w}: dilation={m.dilation} is not supported (dilation 1 only)")
    if m.padding_mode != "zeros":
        raise ExportError(f"{w}: padding_mode='{m.padding_mode}' is not supported ('zeros' only)")
    if isinstance(m.padding, str):
        raise ExportError(f"{w}: padding='{m.padding}' is not supported (integer padding only)")
    return {
        "type": "Conv2d",
        "in_channels": int(m.in_channels),
        "out_channels": int(m.out_channels),
        "kernel_size": _square(m.kernel_size, "kernel_size", w),
        "stride": _square(m.stride, "stride", w),
        "padding": _square(m.padding, "padding", w),
        "bias": m.bias is not None,
    }


def _batchnorm2d(path, m):
    w = _mod_where(path, m)
    if not m.affine:
        raise ExportError(f"{w}: affine=False is not supported (affine=True only)")
    if not m.track_running_stats:
        raise ExportError(f"{w}: track_running_stats=False is not supported "
                          f"(track_running_stats=True only)")
    return {
        "type": "BatchNorm2d",
        "num_features": int(m.num_features),
        "eps": float(m.eps),
        "momentum": None if m.momentum is None else float(m.momentum),
    }


def _linear(path, m):
    return {
        "type": "Linear",
        "in_features": int(m.in_features),
        "out_features": int(m.out_features),
        "bias": m.bias is not None,
    }


def _gelu(where, approximate):
    if approximate != "none":
        raise ExportError(f"{where}: approximate='{approximate}' is not supported "
                          f"(approximate='none' only, the exact erf form)")
    return {"type": "GELU", "approximate": "none"}


def _softplus(where, beta, threshold):
    if beta != 1 or threshold != 20:
        raise ExportError(f"{where}: beta={beta}, threshold={threshold} is not supported "
                          f"(beta=1, threshold=20 only)")
    return {"type": "Softplus", "beta": 1, "threshold": 20}


def _maxpool(where, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    k = _square(kernel_size, "kernel_size", where)
    s = k if stride is None or stride == [] or stride == () else _square(stride, "stride", where)
    if _square(padding, "padding", where) != 0:
        raise ExportError(f"{where}: padding={padding} is not supported (padding 0 only)")
    if _square(dilation, "dilation", where) != 1:
        raise ExportError(f"{where}: dilation={dilation} is not supported (dilation 1 only)")
    if ceil_mode:
        raise ExportError(f"{where}: ceil_mode=True is not supported (ceil_mode False only)")
    if return_indices:
        raise ExportError(f"{where}: return_indices=True is not supported")
    return {"type": "MaxPool2d", "kernel_size": k, "stride": s}


def _avgpool(where, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    k = _square(kernel_size, "kernel_size", where)
    s = k if stride is None or stride == [] or stride == () else _square(stride, "stride", where)
    if _square(padding, "padding", where) != 0:
        raise ExportError(f"{where}: padding={padding} is not supported (padding 0 only)")
    if ceil_mode:
        raise ExportError(f"{where}: ceil_mode=True is not supported (ceil_mode False only)")
    if divisor_override is not None:
        raise ExportError(f"{where}: divisor_override={divisor_override} is not supported")
    # count_include_pad has no effect without padding
    return {"type": "AvgPool2d", "kernel_size": k, "stride": s}


def _adaptive_avgpool(where, output_size):
    ok = output_size == 1 or (isinstance(output_size, (tuple, list))
                              and all(o == 1 for o in output_size) and len(output_size) in (1, 2))
    if not ok:
        raise ExportError(f"{where}: output_size={output_size!r} is not supported "
                          f"(output_size 1 only)")
    return {"type": "AdaptiveAvgPool2d", "output_size": 1}


def _flatten(where, start_dim, end_dim):
    if start_dim != 1 or end_dim != -1:
        raise ExportError(f"{where}: flatten(start_dim={start_dim}, end_dim={end_dim}) is not "
                          f"supported (start_dim 1, end_dim -1 only)")
    return {"type": "Flatten", "start_dim": 1, "end_dim": -1}


def _module_layer(path, m):
    """The layer dict (without name/inputs) for a leaf module, or ExportError."""
    w = _mod_where(path, m)
    t = type(m)
    if t is nn.Conv2d:
        return _conv2d(path, m)
    if t is nn.BatchNorm2d:
        return _batchnorm2d(path, m)
    if t is nn.Linear:
        return _linear(path, m)
    if t is nn.ReLU:
        return {"type": "ReLU"}
    if t is nn.Tanh:
        return {"type": "Tanh"}
    if t is nn.Sigmoid:
        return {"type": "Sigmoid"}
    if t is nn.GELU:
        return _gelu(w, m.approximate)
    if t is nn.Softplus:
        return _softplus(w, m.beta, m.threshold)
    if t is nn.Identity:
        return {"type": "Identity"}
    if t is nn.MaxPool2d:
        return _maxpool(w, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                        m.return_indices)
    if t is nn.AvgPool2d:
        return _avgpool(w, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                        m.divisor_override)
    if t is nn.AdaptiveAvgPool2d:
        return _adaptive_avgpool(w, m.output_size)
    if t is nn.Flatten:
        return _flatten(w, m.start_dim, m.end_dim)
    raise ExportError(f"{w}: unsupported module type {t.__module__}.{t.__qualname__} "
                      f"(supported: Conv2d, BatchNorm2d, Linear, ReLU, Tanh, GELU, Sigmoid, "
                      f"Softplus, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, "
                      f"Sequential and fx-traceable custom modules)")


# ---------------------------------------------------------------------------------------------
# functions and methods -> layer dicts

# name -> (parameter names, defaults, builder(where, bound arguments) -> layer dict)
_FUNCTIONS = {
    F.relu: (["input", "inplace"], {"inplace": False}, lambda w, b: {"type": "ReLU"}),
    torch.relu: (["input"], {}, lambda w, b: {"type": "ReLU"}),
    torch.tanh: (["input"], {}, lambda w, b: {"type": "Tanh"}),
    F.tanh: (["input"], {}, lambda w, b: {"type": "Tanh"}),
    torch.sigmoid: (["input"], {}, lambda w, b: {"type": "Sigmoid"}),
    F.sigmoid: (["input"], {}, lambda w, b: {"type": "Sigmoid"}),
    F.gelu: (["input", "approximate"], {"approximate": "none"},
             lambda w, b: _gelu(w, b["approximate"])),
    F.softplus: (["input", "beta", "threshold"], {"beta": 1, "threshold": 20},
                 lambda w, b: _softplus(w, b["beta"], b["threshold"])),
    F.max_pool2d: (["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                    "return_indices"],
                   {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                    "return_indices": False},
                   lambda w, b: _maxpool(w, b["kernel_size"], b["stride"], b["padding"],
                                         b["dilation"], b["ceil_mode"], b["return_indices"])),
    F.avg_pool2d: (["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                    "divisor_override"],
                   {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                    "divisor_override": None},
                   lambda w, b: _avgpool(w, b["kernel_size"], b["stride"], b["padding"],
                                         b["ceil_mode"], b["count_include_pad"],
                                         b["divisor_override"])),
    F.adaptive_avg_pool2d: (["input", "output_size"], {},
                            lambda w, b: _adaptive_avgpool(w, b["output_size"])),
    torch.flatten: (["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1},
                    lambda w, b: _flatten(w, b["start_dim"], b["end_dim"])),
}

_METHODS = {
    "relu": (["input"], {}, lambda w, b: {"type": "ReLU"}),
    "tanh": (["input"], {}, lambda w, b: {"type": "Tanh"}),
    "sigmoid": (["input"], {}, lambda w, b: {"type": "Sigmoid"}),
    "flatten": (["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1},
                lambda w, b: _flatten(w, b["start_dim"], b["end_dim"])),
}

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _target_name(target):
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    return f"{mod}.{name}" if mod else name


def _node_where(node):
    return f"fx node '{node.name}' ({node.op} {_target_name(node.target)})"


# ---------------------------------------------------------------------------------------------
# shape propagation


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced graph once and records every node's value."""

    def __init__(self, gm):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node themselves
        self.values = {}

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as e:
            shapes = [list(a.shape[1:]) for a in self.fetch_args_kwargs_from_env(n)[0]
                      if isinstance(a, torch.Tensor)]
            where = _node_where(n)
            if n.op == "call_module":
                where = _mod_where(n.target, self.module.get_submodule(n.target))
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"{where}: fails on per-sample input shape(s) {shapes}: "
                              f"{type(e).__name__}: {first}") from e
        self.values[n.name] = out
        return out


def _record_values(module, gm, input_shape):
    """Runs a zero batch of one sample through `gm` (eval mode, no grad); node name -> value."""
    params = list(module.parameters()) + list(module.buffers())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    device = params[0].device if params else torch.device("cpu")
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        rec = _ShapeRecorder(gm)
        with torch.no_grad():
            rec.run(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    except ExportError:
        raise
    except Exception as e:  # a shape mismatch in the user's own module
        raise ExportError(f"running a [1, {', '.join(map(str, input_shape))}] input through the "
                          f"module failed: {type(e).__name__}: {e}") from e
    finally:
        for m, t in modes.items():
            m.train(t)
    return rec.values


# ---------------------------------------------------------------------------------------------
# export


def to_network(module, input_shape=(3, 32, 32)):
    """Builds the network-file dictionary (format version 1) of `module`.

    `module` is traced with torch.fx.symbolic_trace; every node becomes a layer (or, for
    `x.size(0)`-style shape queries and empty Sequentials, nothing). A zero batch of shape
    `[1, *input_shape]` is run through the module (in eval mode, restored afterwards) to check
    the shapes each layer receives. Raises ExportError (a ValueError) for anything the format
    cannot express, naming the module path and type or the fx node and target.
    """
    if not isinstance(module, nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got {type(module).__name__}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (1, 3) or any(s <= 0 for s in input_shape):
        raise ExportError(f"input_shape {input_shape} must be [channels, height, width] or "
                          f"[features] with positive sizes")

    # tied parameters: one tensor under two names would be two independent tensors in flatmin
    seen = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ExportError(f"parameter '{name}' is the same tensor as '{seen[id(p)]}' "
                              f"(shared parameters are not supported: each layer owns its "
                              f"tensors)")
        seen[id(p)] = name

    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:
        raise ExportError(f"torch.fx.symbolic_trace failed on {type(module).__name__}: "
                          f"{type(e).__name__}: {e}") from e
    modules = dict(gm.named_modules())
    values = {}  # filled by the shape run, after every node has been mapped to a layer
    checks = []  # (node, layer name, layer dict, input fx names), checked after the shape run

    def per_sample(node_name):
        v = values[node_name]
        if not isinstance(v, torch.Tensor):
            return None
        return list(v.shape[1:])

    layers = []
    used_names = {"input"}
    # fx node name -> what it is: ("tensor", layer name) or ("size0",) for x.size(0)
    ref = {}
    module_calls = {}
    placeholder_seen = False
    output_node = None

    def unique(base):
        name, k = base, 1
        while name in used_names:
            name = f"{base}_{k}"
            k += 1
        return name

    def tensor_arg(node, arg, what="input"):
        if not isinstance(arg, torch.fx.Node):
            raise ExportError(f"{_node_where(node)}: its {what} is not a tensor ({arg!r})")
        r = ref.get(arg.name)
        if r is None or r[0] != "tensor":
            raise ExportError(f"{_node_where(node)}: its {what} '{arg.name}' is not a tensor "
                              f"layer")
        return r[1]

    def emit(node, name, layer, inputs):
        checks.append((node, name, dict(layer), inputs))
        entry = {"name": name, "type": layer.pop("type")}
        prev = layers[-1]["name"] if layers else "input"
        if entry["type"] == "Add":
            entry["inputs"] = [ref_name[i] for i in inputs]
        elif ref_name[inputs[0]] != prev:
            entry["input"] = ref_name[inputs[0]]
        entry.update(layer)
        layers.append(entry)
        used_names.add(name)
        ref[node.name] = ("tensor", name)
        ref_name[node.name] = name

    ref_name = {}  # fx node name -> layer name ("input" for the placeholder)

    def input_node(node, arg, what="input"):
        tensor_arg(node, arg, what)
        return arg.name

    for node in gm.graph.nodes:
        op = node.op
        if op == "placeholder":
            if placeholder_seen:
                raise ExportError(f"{_node_where(node)}: the module takes more than one input")
            placeholder_seen = True
            ref[node.name] = ("tensor", "input")
            ref_name[node.name] = "input"
            continue
        if op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node) or ref.get(out.name, ("",))[0] != "tensor":
                raise ExportError(f"{_node_where(node)}: the module must return one tensor "
                                  f"(the logits), got {out!r}")
            output_node = out
            if not layers or layers[-1]["name"] != ref_name[out.name]:
                # the output is an earlier layer (or the input): make it the last layer
                name = unique("output")
                entry = {"name": name, "type": "Identity"}
                if ref_name[out.name] != (layers[-1]["name"] if layers else "input"):
                    entry["input"] = ref_name[out.name]
                layers.append(entry)
                used_names.add(name)
            continue
        if op == "get_attr":
            raise ExportError(f"{_node_where(node)}: direct use of parameter or buffer "
                              f"'{node.target}' outside its module is not supported")
        if op == "call_module":
            path = node.target
            m = modules[path]
            layer = _module_layer(path, m)
            has_state = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            if path in module_calls:
                if has_state:
                    raise ExportError(f"{_mod_where(path, m)} is called twice (fx nodes "
                                      f"'{module_calls[path]}' and '{node.name}'): shared "
                                      f"parameters are not supported, each layer owns its "
                                      f"tensors; use a second module")
                name = unique(node.name)
            else:
                if path == "input" or path in used_names:
                    if has_state:
                        raise ExportError(f"{_mod_where(path, m)}: its path clashes with the "
                                          f"layer name '{path}'")
                    name = unique(node.name)
                else:
                    name = path
            module_calls.setdefault(path, node.name)
            if len(node.args) != 1 or node.kwargs:
                raise ExportError(f"{_mod_where(path, m)}: called with "
                                  f"{len(node.args)} arguments and keywords "
                                  f"{sorted(node.kwargs)}; one tensor argument only")
            emit(node, name, layer, [input_node(node, node.args[0])])
            continue
        if op == "call_function" and node.target in _ADD_FUNCTIONS:
            w = _node_where(node)
            b = _bind(w, ["input", "other", "alpha"], {"alpha": 1}, node.args, node.kwargs)
            if b["alpha"] != 1:
                raise ExportError(f"{w}: alpha={b['alpha']} is not supported (alpha 1 only)")
            a1 = input_node(node, b["input"], "first operand")
            a2 = input_node(node, b["other"], "second operand")
            emit(node, unique(node.name), {"type": "Add"}, [a1, a2])
            continue
        if op == "call_method" and node.target == "add":
            w = _node_where(node)
            b = _bind(w, ["input", "other", "alpha"], {"alpha": 1}, node.args, node.kwargs)
            if b["alpha"] != 1:
                raise ExportError(f"{w}: alpha={b['alpha']} is not supported (alpha 1 only)")
            a1 = input_node(node, b["input"], "first operand")
            a2 = input_node(node, b["other"], "second operand")
            emit(node, unique(node.name), {"type": "Add"}, [a1, a2])
            continue
        if op == "call_method" and node.target == "size":
            # x.size(0): the batch size, used by view/reshape below
            w = _node_where(node)
            b = _bind(w, ["input", "dim"], {"dim": None}, node.args, node.kwargs)
            tensor_arg(node, b["input"])
            if b["dim"] != 0:
                raise ExportError(f"{w}: only x.size(0) (the batch size) is supported, as in "
                                  f"x.view(x.size(0), -1)")
            ref[node.name] = ("size0",)
            continue
        if op == "call_function" and node.target is getattr and len(node.args) == 2 \
                and node.args[1] == "shape":
            tensor_arg(node, node.args[0])
            ref[node.name] = ("shape",)
            continue
        if op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
                and isinstance(node.args[0], torch.fx.Node) \
                and ref.get(node.args[0].name, ("",))[0] == "shape":
            if node.args[1] != 0:
                raise ExportError(f"{_node_where(node)}: only x.shape[0] (the batch size) is "
                                  f"supported, as in x.reshape(x.shape[0], -1)")
            ref[node.name] = ("size0",)
            continue
        if op == "call_method" and node.target in ("view", "reshape"):
            w = _node_where(node)
            if node.kwargs or len(node.args) < 2:
                raise ExportError(f"{w}: unsupported arguments")
            src = node.args[0]
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            ok = (len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], torch.fx.Node)
                  and ref.get(shape[0].name, ("",))[0] == "size0")
            if not ok:
                raise ExportError(f"{w}: only x.{node.target}(x.size(0), -1) (a flatten) is "
                                  f"supported, got shape {tuple(shape)!r}")
            emit(node, unique(node.name), {"type": "Flatten", "start_dim": 1, "end_dim": -1},
                 [input_node(node, src)])
            continue
        spec = None
        if op == "call_function":
            try:
                spec = _FUNCTIONS.get(node.target)
            except TypeError:
                spec = None
        elif op == "call_method":
            spec = _METHODS.get(node.target)
        if spec is None:
            raise ExportError(f"{_node_where(node)}: unsupported function or method")
        names, defaults, build = spec
        w = _node_where(node)
        b = _bind(w, names, defaults, node.args, node.kwargs)
        layer = build(w, b)
        emit(node, unique(node.name), layer, [input_node(node, b["input"])])

    if not placeholder_seen:
        raise ExportError("the module takes no input")

    # shapes: run one zero sample through the module, check what every layer receives
    values.update(_record_values(module, gm, input_shape))
    for node, name, layer, inputs in checks:
        _check_shapes(node, name, layer, [per_sample(i) for i in inputs], per_sample(node.name))
    shape = per_sample(output_node.name)
    if shape is None or len(shape) != 1:
        raise ExportError(f"the module's output has per-sample shape {shape}; it must be "
                          f"[classes] (flatten before the last layer)")

    # every state entry must belong to a layer (an unused module's tensors would be extra)
    layer_names = {l["name"] for l in layers}
    for key in module.state_dict().keys():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner not in layer_names:
            raise ExportError(f"state_dict entry '{key}' belongs to no layer (module "
                              f"'{owner}' is not called in forward, or holds a tensor of its "
                              f"own outside a supported layer); flatmin would reject it as an "
                              f"extra tensor")

    return {"flatmin_network": FORMAT_VERSION, "input": list(input_shape), "layers": layers}


def _check_shapes(node, name, layer, in_shapes, out_shape):
    """Checks a layer's recorded per-sample input shapes against its arguments."""
    t = layer["type"]
    where = f"layer '{name}' ({t}, {_node_where(node)})"
    for s in in_shapes:
        if s is None:
            raise ExportError(f"{where}: its input is not a tensor")
    s = in_shapes[0]
    if t == "Linear":
        if len(s) != 1:
            raise ExportError(f"{where}: receives per-sample shape {s}; Linear needs a flat "
                              f"[features] input (flatten first)")
        if s[0] != layer["in_features"]:
            raise ExportError(f"{where}: in_features={layer['in_features']} but receives "
                              f"{s[0]} features")
    elif t in ("Conv2d", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"):
        if len(s) != 3:
            raise ExportError(f"{where}: receives per-sample shape {s}; needs [C, H, W]")
        want = layer.get("in_channels", layer.get("num_features"))
        if want is not None and s[0] != want:
            key = "in_channels" if t == "Conv2d" else "num_features"
            raise ExportError(f"{where}: {key}={want} but receives {s[0]} channels")
    elif t == "Add":
        if in_shapes[0] != in_shapes[1]:
            raise ExportError(f"{where}: adds per-sample shapes {in_shapes[0]} and "
                              f"{in_shapes[1]}; they must be equal (no broadcasting)")
    if out_shape is None:
        raise ExportError(f"{where}: does not produce a tensor")


def network_json(network):
    """Serializes a network dictionary as flatmin writes it: one layer per line, UTF-8, a final
    newline; deterministic (keys in insertion order)."""
    head = json.dumps({k: v for k, v in network.items() if k != "layers"})
    lines = [head[:-1] + ', "layers": [']
    for i, layer in enumerate(network["layers"]):
        sep = "," if i + 1 < len(network["layers"]) else ""
        lines.append("  " + json.dumps(layer) + sep)
    lines.append("]}")
    return "\n".join(lines) + "\n"


def export(module, path, input_shape=(3, 32, 32)):
    """Writes the network file of `module` (a torch.nn.Module) to `path` and returns its
    dictionary.

    The format is docs/network-file.md's, version 1 (`"flatmin_network": 1`); `input_shape` is
    the shape of one sample, `[channels, height, width]` or `[features]`. The module's weights
    are its `state_dict()`; save them with `safetensors.torch.save_file(module.state_dict(),
    ...)`. Raises ExportError (a ValueError) naming the module path and type, or the fx node and
    target, for anything the format cannot express; nothing is written then.
    """
    network = to_network(module, input_shape)
    text = network_json(network)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)
    return network


def load_weights(module, path):
    """Loads a safetensors state (a flatmin run's `model.safetensors`, a `--weights` file, or
    anything `safetensors.torch.save_file(module.state_dict(), path)` wrote) into `module` with a
    strict `load_state_dict`, and returns `module`.

    Floating-point tensors are converted to the dtype of the module's own entry (float32 weights
    load into a float64 module and back); integer entries (`num_batches_tracked`) load as they
    are. Missing or unexpected keys, or a shape that differs, raise ExportError (a ValueError)
    naming the file and the keys; the module is left unchanged then.
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ExportError(f"{path}: does not match {type(module).__name__}'s state_dict: "
                          + "; ".join(parts))
    converted = {}
    for k, ref in own.items():
        t = state[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ExportError(f"{path}: '{k}' has shape {list(t.shape)}, the module's has "
                              f"{list(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise ExportError(f"{path}: '{k}' has dtype {t.dtype}, the module's is {ref.dtype}")
        if t.is_floating_point():
            t = t.to(dtype=ref.dtype)
        converted[k] = t.to(device=ref.device)
    module.load_state_dict(converted, strict=True)
    return module


# ---------------------------------------------------------------------------------------------
# command line


def _load_factory(spec):
    """`pkg.mod:factory` or `path/to/file.py:factory` -> the callable."""
    if ":" not in spec:
        raise SystemExit(f"--module wants MODULE:FACTORY (e.g. mypkg.models:make_net), got {spec!r}")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py") or os.sep in mod_name:
        file = os.path.abspath(mod_name)
        sys.path.insert(0, os.path.dirname(file))
        s = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0],
                                                   file)
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        mod = importlib.import_module(mod_name)
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv=None):
    """Command line: `export_torch.py --module pkg.mod:factory OUT.json [--input-shape 3,32,32]
    [--weights W.safetensors] [--weights-out OUT.safetensors]`. Returns the exit status."""
    ap = argparse.ArgumentParser(description="Export a PyTorch module to a flatmin network file.")
    ap.add_argument("--module", required=True,
                    help="MODULE:FACTORY, a callable with no arguments returning the nn.Module "
                         "(MODULE a dotted import path, or a .py file)")
    ap.add_argument("out", help="the network file to write (JSON)")
    ap.add_argument("--input-shape", default="3,32,32",
                    help="one sample's shape, comma-separated (default 3,32,32)")
    ap.add_argument("--weights", help="load this safetensors state into the module first")
    ap.add_argument("--weights-out",
                    help="also write the module's state_dict here (safetensors)")
    a = ap.parse_args(argv)
    try:
        factory = _load_factory(a.module)
    except (ImportError, AttributeError, OSError) as e:
        print(f"error: cannot load {a.module}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    module = factory()
    if not isinstance(module, nn.Module):
        print(f"error: {a.module} returned {type(module).__name__}, not a torch.nn.Module",
              file=sys.stderr)
        return 2
    shape = tuple(int(s) for s in a.input_shape.split(",") if s.strip())
    try:
        if a.weights:
            load_weights(module, a.weights)
        net = export(module, a.out, input_shape=shape)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.weights_out:
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                  a.weights_out)
    d = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"wrote {a.out}: {len(net['layers'])} layers, {d} trainable parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
