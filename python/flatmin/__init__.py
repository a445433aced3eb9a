"""flatmin from Python: exact Hessian-vector products, Hessian traces, eigenvalues and spectral
densities of a network's mean cross-entropy, with numpy arrays in and out.

    import flatmin
    net = flatmin.Net.preset("cnn-s")                 # or Net.load("net.json"), Net.from_torch(m)
    net.load_state_dict(module.state_dict())          # PyTorch names, float32 or float64
    out = net.hvp(x, y, v)                            # loss, logits, grad, hvp
    t = net.trace(x, y, method="exact")["trace"]      # exact, in seconds where others estimate

`x` is a float array `[N, *net.input_shape]` already normalized (as a PyTorch user's tensors
are), `y` an integer array `[N]`; torch tensors are accepted wherever arrays are. For more data
than one array holds, pass an iterable of `(x, y)` batches as `x` and leave `y` out: the loss is
then the mean over all images. The engine runs without the GIL on rayon's threads
(`set_num_threads`, or the `RAYON_NUM_THREADS` variable); results are bit-identical for any
thread count. Bad arguments raise `ValueError` naming the argument.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._native import num_threads, set_num_threads

__all__ = ["Net", "set_num_threads", "num_threads", "PRESETS"]

#: The preset networks (docs: reference_models.md of the project).
PRESETS = ("tiny-tanh", "mlp-s", "cnn-s", "resnet20", "resnet18")

ArrayLike = Any
"""A numpy array, a torch tensor (CPU or not; it is detached and copied to the CPU), or anything
`numpy.asarray` accepts."""

Batches = Iterable[Tuple[ArrayLike, ArrayLike]]


def _numpy(a: ArrayLike) -> np.ndarray:
    """`a` as a numpy array; torch tensors by `.detach().cpu().numpy()`."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if hasattr(a, "resolve_conj"):
            a = a.resolve_conj()
        return a.numpy()
    return np.asarray(a)


def _floats(a: ArrayLike, what: str) -> np.ndarray:
    """A C-contiguous float32 or float64 array (other float and integer types become
    float64)."""
    try:
        arr = _numpy(a)
    except ValueError as e:
        raise ValueError(f"{what}: not an array: {e}") from None
    # np.asarray(order="C") keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    if arr.dtype == np.float32 or arr.dtype == np.float64:
        return np.asarray(arr, order="C")
    if arr.dtype.kind in "fiu" or arr.dtype == np.bool_:
        return np.asarray(arr, dtype=np.float64, order="C")
    raise ValueError(f"{what}: expected a float array, got dtype {arr.dtype}")


def _labels(a: ArrayLike, what: str) -> np.ndarray:
    try:
        arr = _numpy(a)
    except ValueError as e:
        raise ValueError(f"{what}: not an array of labels: {e}") from None
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer class labels, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: label {arr.max()} is out of range")
    return np.asarray(arr, dtype=np.int64, order="C")


def _batches(x: Union[ArrayLike, Batches], y: Optional[ArrayLike]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """`(x, y)`, or the batches of an iterable passed as `x` with `y` left out."""
    if y is not None:
        return [(_floats(x, "x"), _labels(y, "y"))]
    if isinstance(x, np.ndarray) or hasattr(x, "detach"):
        raise ValueError("y: missing; pass labels, or an iterable of (x, y) batches as x")
    out = []
    try:
        items = iter(x)
    except TypeError:
        raise ValueError("x: expected an array with labels y, or an iterable of (x, y) batches") from None
    for b, item in enumerate(items):
        try:
            xb, yb = item
        except (TypeError, ValueError):
            raise ValueError(f"x: batch {b} is not an (x, y) pair") from None
        out.append((_floats(xb, f"x (batch {b})"), _labels(yb, f"y (batch {b})")))
    if not out:
        raise ValueError("x: the batch iterator gave no batches")
    return out


def _direction(v: Mapping[str, ArrayLike], what: str) -> List[Tuple[str, np.ndarray]]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{what}: expected a dict {{parameter name: array}}, got {type(v).__name__}")
    return [(str(k), _floats(a, f"{what}[{k!r}]")) for k, a in v.items()]


class Net:
    """A network (a preset, a network file, or an exported PyTorch module) with its state:
    trainable parameters and BatchNorm buffers, named as in PyTorch's `state_dict`."""

    def __init__(self, native: "_native.Net"):
        self._net = native

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> "Net":
        """A preset (`tiny-tanh`, `mlp-s`, `cnn-s`, `resnet20`, `resnet18`) or a custom
        `mlp:W1,W2,...:ACT`, initialized as PyTorch would (from `seed`)."""
        return cls(_native.Net.preset(name, seed))

    @classmethod
    def load(cls, path: str, seed: int = 0) -> "Net":
        """A network file (the project's docs/network-file.md), initialized from `seed`; load
        trained weights with `load_state_dict`."""
        return cls(_native.Net.load(str(path), seed))

    @classmethod
    def from_json(cls, text: str, origin: str = "network", seed: int = 0) -> "Net":
        """A network file's text; `origin` names it in errors."""
        return cls(_native.Net.from_json(text, origin, seed))

    @classmethod
    def from_torch(cls, module: Any, input_shape: Sequence[int] = (3, 32, 32)) -> "Net":
        """The network of a `torch.nn.Module` (exported by `flatmin.export_torch`: layers
        flatmin supports, `nn.Sequential` nesting, fx-traceable modules with residual `+`),
        with the module's current `state_dict()` loaded. Needs torch."""
        from . import export_torch

        network = export_torch.to_network(module, tuple(input_shape))
        net = cls.from_json(export_torch.network_json(network), origin=type(module).__name__)
        net.load_state_dict(module.state_dict())
        return net

    # -- description and state ----------------------------------------------------------------

    @property
    def param_names(self) -> List[str]:
        """Names of the trainable parameters, in order."""
        return self._net.param_names

    @property
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of every trainable parameter."""
        return {n: tuple(s) for n, s in zip(self._net.param_names, self._net.param_shapes)}

    @property
    def num_params(self) -> int:
        """Number of trainable scalars."""
        return self._net.num_params

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input sample (`(3, 32, 32)` for the presets)."""
        return tuple(self._net.input_shape)

    @property
    def num_classes(self) -> int:
        """Number of classes (logits per sample)."""
        return self._net.num_classes

    @property
    def has_batch_norm(self) -> bool:
        """Whether `bn_mode` matters."""
        return self._net.has_batch_norm

    @property
    def loss(self) -> str:
        """The objective every loss, gradient, HVP, trace and spectrum is of: "ce" (softmax
        cross-entropy, the default) or "mse" (squared error against one-hot targets, mean over
        all logits, as `torch.nn.functional.mse_loss(z, one_hot(y))`). Settable."""
        return self._net.loss

    @loss.setter
    def loss(self, name: str) -> None:
        self._net.loss = name

    def network_json(self) -> str:
        """The network file text of this network."""
        return self._net.network_json()

    def state_dict(self) -> Dict[str, np.ndarray]:
        """The state in `state_dict` order: float64 arrays, and 0-d int64 arrays for
        BatchNorm's `num_batches_tracked`. `torch.from_numpy` of each loads into the PyTorch
        module (after `.float()` for a float32 module)."""
        return dict(self._net.state_items())

    def load_state_dict(self, state: Mapping[str, ArrayLike]) -> None:
        """Loads a state named as PyTorch's `state_dict()` (float32 or float64 arrays or
        tensors; int64 `num_batches_tracked`). Strict: every entry must be present with its
        shape, and no other; nothing changes when it raises."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state: expected a mapping {{name: array}}, got {type(state).__name__}")
        items = []
        for k, a in state.items():
            arr = _numpy(a)
            if arr.dtype.kind in "iu":
                arr = np.asarray(arr, dtype=np.int64, order="C")
            else:
                arr = _floats(arr, f"state_dict[{k!r}]")
            items.append((str(k), arr))
        self._net.load_state_items(items)

    # -- measurements -------------------------------------------------------------------------

    def hvp(self, x: Union[ArrayLike, Batches], y: Optional[ArrayLike] = None,
            v: Union[None, Mapping[str, ArrayLike], Sequence[Mapping[str, ArrayLike]]] = None,
            *, dtype: str = "f64", bn_mode: str = "eval") -> Dict[str, Any]:
        """Logits, mean cross-entropy, gradient and exact Hessian-vector products.

        `v`: a direction `{name: array}` for every trainable parameter, or a list of K of them
        (one batched pass), or None (gradient only). Returns `{"loss": float, "logits": array
        [N, classes], "grad": {name: array}, "hvp": {name: array}}`, with `"hvp"` a list of K
        dicts for a list `v` and absent for `v=None`. Arrays come back in `dtype` ("f64" or
        "f32"). `bn_mode`: "train" (batch statistics) or "eval" (running statistics).
        """
        batches = _batches(x, y)
        many = isinstance(v, (list, tuple))
        dirs = [] if v is None else [_direction(d, f"v[{k}]") for k, d in enumerate(v)] if many \
            else [_direction(v, "v")]
        out = self._net.hvp(batches, dirs, dtype, bn_mode)
        if v is None:
            del out["hvp"]
        elif not many:
            out["hvp"] = out["hvp"][0]
        return out

    def trace(self, x: Union[ArrayLike, Batches], y: Optional[ArrayLike] = None, *,
              method: str = "exact", dtype: str = "f64", bn_mode: str = "eval",
              probes: Optional[int] = None, seed: int = 0, per_layer: bool = False,
              diagonal: bool = False, tol: float = 0.01, max_probes: int = 1000,
              budget: int = 99, chunk_size: int = 128, directions: Optional[int] = None,
              max_seconds: float = 3600.0) -> Dict[str, Any]:
        """The Hessian trace of the mean cross-entropy.

        `method`: "exact" (structural where it applies, else one HVP per parameter),
        "structural", "exact-hvp", "hutchinson" (`probes` fixed, else stop when the 95%
        half-width is below `tol` of the estimate, at most `max_probes`), "hutchpp" (`budget`
        HVPs) or "auto". Returns the keys of `flatmin trace --json` (`trace`,
        `normalized_trace`, `std_error`, `method`, `requested_method`, `exact`, `num_params`,
        `samples`, `seconds`, ...), `layers` {name: {shape, numel, trace, normalized_trace,
        std_error}} with `per_layer`, and `diagonal` {name: array} (the exact Hessian diagonal)
        with `diagonal`. Exact HVP methods estimated to take more than `max_seconds` raise.
        """
        batches = _batches(x, y)
        raw = self._net.trace(batches, method=method, dtype=dtype, bn_mode=bn_mode, seed=seed,
                              probes=probes, tol=tol, max_probes=max_probes, budget=budget,
                              chunk_size=chunk_size, directions=directions, diagonal=diagonal,
                              max_seconds=max_seconds)
        out = json.loads(raw.pop("json"))
        out.update(requested_method=method, bn_mode=bn_mode, dtype=dtype, seed=seed,
                   images=out["samples"], batches=len(batches))
        layers = out.pop("layers")
        if per_layer:  # in parameter order (JSON objects come back sorted by name)
            out["layers"] = {n: layers[n] for n in self.param_names if n in layers}
        out.update(raw)
        return out

    def eigenvalues(self, x: Union[ArrayLike, Batches], y: Optional[ArrayLike] = None, *,
                    k: int = 1, steps: Optional[int] = None, tol: float = 1e-6,
                    which: str = "largest",
                    eigenvectors: bool = False, seed: int = 0, dtype: str = "f64",
                    bn_mode: str = "eval") -> Dict[str, Any]:
        """The `k` extreme Hessian eigenvalues by Lanczos with full reorthogonalization (at
        most `steps` HVPs, default max(100, k); fewer than `k` raises). `which`: "largest", "smallest" or "magnitude". Returns
        `eigenvalues` and `residuals` (arrays, most extreme first), `iterations`, `converged`,
        `hvps`, and `eigenvectors` (a list of k {name: array}, unit norm) when asked for."""
        return self._net.eigenvalues(_batches(x, y), k=k, steps=steps, tol=tol, which=which,
                                     seed=seed, eigenvectors=eigenvectors, dtype=dtype,
                                     bn_mode=bn_mode)

    def density(self, x: Union[ArrayLike, Batches], y: Optional[ArrayLike] = None, *,
                probes: int = 8, steps: int = 64, points: int = 1000,
                sigma: Optional[float] = None, seed: int = 0, dtype: str = "f64",
                bn_mode: str = "eval") -> Dict[str, Any]:
        """The Hessian's spectral density by stochastic Lanczos quadrature (`probes`
        Rademacher probes, `steps` Lanczos steps each). Returns `grid` and `density` (the
        quadrature broadened by a Gaussian of width `sigma`, default 1% of the spectrum's
        span; it integrates to about 1), `nodes` and `weights` (the raw quadrature),
        `trace` and `std_error` (the probes' trace estimate), `second_moment`, `hvps`."""
        return self._net.density(_batches(x, y), probes=probes, steps=steps, points=points,
                                 sigma=sigma, seed=seed, dtype=dtype, bn_mode=bn_mode)

    def __repr__(self) -> str:
        return repr(self._net)
