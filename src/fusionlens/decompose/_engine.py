"""Dispatch of intercepted torch calls to linearization rules.

Every torch function that receives a :class:`~fusionlens.decompose._stream.Stream` lands in
:meth:`Engine.dispatch`. The operating point (``total``) is always computed with the original function on the
original values, so the decomposition's total *is* the model's output; a rule only computes the components.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._stream import BlockedParts, Stream, replace_streams, streams_in, unwrap

# Calls that read metadata or leave the tensor world: answered from the operating point.
_PASSTHROUGH = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "is_floating_point",
    "is_complex", "element_size", "data_ptr", "storage_offset", "item", "tolist", "numpy", "__len__", "__bool__",
    "__int__", "__float__", "__index__", "__format__", "__repr__", "__str__", "__hash__", "untyped_storage",
    "get_device", "__array__", "requires_grad_", "retain_grad", "register_hook", "backward", "__reduce_ex__",
    "is_nonzero", "equal", "allclose", "has_names", "is_inference", "__dlpack__", "__contains__",
})
# Calls that read a tensor's values (not only its metadata): impossible when only shapes are followed.
_READS_VALUES = frozenset({
    "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__", "is_nonzero", "equal",
    "allclose", "data_ptr", "untyped_storage", "__dlpack__", "__contains__",
})
# Properties that name the device: those of the real tensors when only shapes are followed (meta tensors).
_DEVICE_PROPERTIES = frozenset({"device", "is_meta", "is_cpu", "is_cuda", "is_mps", "is_xpu"})
# Tensor-valued properties that are linear maps of the tensor; every other property is metadata.
_LINEAR_PROPERTIES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
# In-place dunders and their out-of-place twins.
_INPLACE_DUNDERS = {
    "__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__",
    "__idiv__": "__truediv__", "__imatmul__": "__matmul__", "__ipow__": "__pow__",
}


class UnsupportedOperationError(NotImplementedError):
    """A decomposed tensor reached an op that has no linearization rule."""


# Frames of these directories are library code: an error names the first frame outside them (the user's line).
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (os.path.dirname(__file__) + os.sep,)


def user_frame() -> str | None:
    """``file:line`` of the innermost caller outside torch and this package: the model code that made the call."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def carries_values(t: Any) -> bool:
    """Whether a tensor can carry modality components: floating-point and complex tensors (integer and boolean
    results of comparisons, indices and casts are piecewise constant in their inputs)."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class Coefficients(list):
    """The recorded coefficients (a list, in call order) and ``batch``: the common leading size of the modality
    inputs they were recorded on (``None`` if the inputs had none)."""

    batch: int | None = None

    def __reduce__(self) -> tuple:  # pickling / deepcopy keep ``batch``
        return Coefficients._rebuild, (list(self), self.batch)

    @staticmethod
    def _rebuild(items: list[Any], batch: int | None) -> Coefficients:
        out = Coefficients(items)
        out.batch = batch
        return out


def input_batch(tensors: list[torch.Tensor]) -> int | None:
    """The leading size shared by all modality inputs, or ``None``."""
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    return sizes.pop() if len(sizes) == 1 else None


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property such as ``x.shape`` or ``x.T``
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _setitem_out(target: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """Out-of-place ``target[index] = value``: affine in (target, value) for a constant index."""
    out = target.clone()
    out[index] = value
    return out


def _copy_out(target: torch.Tensor, source: Any) -> torch.Tensor:
    """Out-of-place ``target.copy_(source)``."""
    return torch.as_tensor(source, dtype=target.dtype, device=target.device).expand_as(target).clone()


def _property(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def read(t: torch.Tensor) -> torch.Tensor:
        return getattr(t, name)

    read.__name__ = name
    return read


class Engine:
    """Holds the state of one decomposition: component names, rule set, bias mode, module path, captures."""

    def __init__(self, names: list[str], rules: Any, bias: str, replay: list[Any] | None = None,
                 record: bool = False, batch: int | None = None, with_output: bool = True,
                 device: torch.device | None = None) -> None:
        self.names = [*names, "bias"]
        # Without the output (a replay whose operating point is not needed): every op after the modalities meet is
        # run on meta tensors for its shapes only, and the rules compute the components on ``device``.
        self.shapes_only = not with_output
        self.device = device
        self._probe = torch.empty(0, device=device) if device is not None else None
        # Coefficients of the linearization (slopes, norm statistics, pooling winners, attention weights), in call
        # order: recorded to freeze a decomposition at one operating point, replayed to evaluate the linearized
        # network at other inputs (the "frozen" perturbation metrics of appendix D.2).
        self.tape: Coefficients | None = None
        if record:
            self.tape = Coefficients()
            self.tape.batch = batch
        self.replay = replay
        self._cursor = 0
        # Coefficients recorded on one sample, replayed on a batch of B: every sample goes through the same
        # linearization. Slopes, norm statistics and bias shares broadcast by themselves; indices, selection masks
        # and the operands of products are expanded to the shapes the ops have now (``coefficient(like=...)``).
        recorded = getattr(replay, "batch", None)
        self.broadcast = replay is not None and recorded == 1 and batch is not None and batch != 1
        if replay is not None and recorded is not None and batch is not None and recorded not in (1, batch):
            raise ValueError(f"coefficients were recorded on a batch of {recorded} and cannot be replayed on a batch "
                             f"of {batch}; record them on one sample to replay them on any batch")
        self.num_components = len(self.names)
        self.num_modalities = len(names)  # stored slices; constants go to the implicit bias component
        self.rules = rules
        self.local_bias = bias == "local"
        self.module_path: list[str] = []
        # modality index -> (op, where) of the first op that turned its values into integers or booleans (indices,
        # comparisons) or into a piecewise-constant output: how a modality can vanish from the output.
        self.dropped: dict[int, tuple[str, str]] = {}
        self._carried: list[Stream] | None = None

    def carried_only(self, name: str, carried: list[Any], steering: list[Any]) -> None:
        """For a rule: of the op's decomposed inputs, only ``carried`` pass values to its output; ``steering`` (the
        queries and keys of an attention) only set coefficients of the linearization."""
        self._carried = [s for s in carried if isinstance(s, Stream)]
        self.note_dropped(name, [s for s in steering if isinstance(s, Stream)])

    # -- helpers for rules -------------------------------------------------------------------------------------
    def parts(self, x: Any) -> torch.Tensor | None:
        """``(M, *shape)`` modality components of a stream; ``None`` for a constant."""
        return x.fl_parts(self.num_modalities) if isinstance(x, Stream) else None

    def components(self, x: Any) -> torch.Tensor:
        """All ``(M + 1, *shape)`` components (bias last) of a stream or a constant."""
        if isinstance(x, Stream):
            return x.fl_components(self.num_modalities)
        out = torch.zeros((self.num_components, *x.shape), dtype=x.dtype, device=x.device)
        out[-1] = x
        return out

    def per_component(self, func: Callable, args: tuple, kwargs: dict) -> list[Any]:
        """``func`` evaluated once per modality, each stream replaced by that modality's slice."""
        results = []
        for k in range(self.num_modalities):
            def slice_k(s: Stream, k: int = k) -> torch.Tensor:
                return s.fl_parts(self.num_modalities)[k]
            a, kw = replace_streams((args, kwargs), slice_k)
            results.append(_call_plain(func, a, kw))
        return results

    def at_zero(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``func`` with every stream replaced by zeros: the op's constant term."""
        a, kw = replace_streams((args, kwargs), lambda s: self.zeros(s.fl_total().shape, s.fl_total()))
        return _call_plain(func, a, kw)

    def zeros(self, shape: Any, like: torch.Tensor) -> torch.Tensor:
        """Zeros of ``like``'s dtype on the device the components live on (``like`` may be a meta operating point)."""
        device = self.device if like.is_meta and self.device is not None else like.device
        return torch.zeros(tuple(shape), dtype=like.dtype, device=device)

    def coefficient(self, compute: Callable[[], Any], like: Any = None) -> Any:
        """An operating-point quantity: computed now (and recorded), or taken from the frozen tape. ``like``: what
        ``compute()`` would return now (same structure), for the shapes of a batch replayed through coefficients
        recorded on one sample; pass it where the value does not broadcast by itself (indices, masks handed back
        to the model, operands of products)."""
        if self.replay is not None:
            if self._cursor >= len(self.replay):
                raise RuntimeError(f"frozen coefficients exhausted in {self.where()}: the model took another path")
            value = self.replay[self._cursor]
            self._cursor += 1
            if self.broadcast and like is not None:
                value = self._expand(value, like)
            return value
        value = compute()
        if self.tape is not None:
            self.tape.append(value)
        return value

    def _expand(self, value: Any, like: Any) -> Any:
        leaves, spec = tree_flatten(value)
        targets = tree_flatten(like)[0]
        if len(targets) != len(leaves):
            return value
        out = []
        for v, t in zip(leaves, targets):
            if isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor) and v.shape != t.shape:
                try:
                    v = v.expand(t.shape)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"a coefficient recorded with shape {tuple(v.shape)} does not broadcast to {tuple(t.shape)} in "
                        f"{self.where()}: replaying a batch through one sample's coefficients needs a model that "
                        "treats samples independently"
                    ) from exc
            out.append(v)
        return tree_unflatten(out, spec)

    def where(self) -> str:
        """Where the current op is: the module path, and the line of model code that called it."""
        path = ".".join(p for p in self.module_path if p)
        place = f"module '{path}'" if path else "the model's own forward (outside any submodule)"
        line = user_frame()
        return f"{place} at {line}" if line else place

    def note_dropped(self, name: str, streams: list[Stream]) -> None:
        """Record, for each modality these streams carry that has no record yet, that ``name`` dropped it."""
        if len(self.dropped) == self.num_modalities:
            return
        owners: set[int] = set()
        for s in streams:
            if s._fl_owner is not None:
                owners.add(s._fl_owner)
            elif s._fl_parts is not None and not s._fl_parts.is_meta:
                owners.update(i for i in range(self.num_modalities)
                              if i not in self.dropped and bool(s._fl_parts[i].any()))
        fresh = [i for i in owners if i not in self.dropped]
        if fresh:
            where = self.where()
            for i in fresh:
                self.dropped[i] = (name, where)

    # -- dispatch ------------------------------------------------------------------------------------------------
    def dispatch(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        name = op_name(func)
        if self.shapes_only and (name in _DEVICE_PROPERTIES or name in _READS_VALUES) and any(
                s.fl_total().is_meta for s in streams_in((args, kwargs))):
            if getattr(func, "__name__", "") == "__get__" and name in _DEVICE_PROPERTIES:
                return getattr(self._probe, name)
            if name in _READS_VALUES:
                raise UnsupportedOperationError(
                    f"'{name}' reads the values of a decomposed tensor in {self.where()}, which a replay without "
                    "the output (with_output=False) does not compute; replay with the output"
                )
        if name in _PASSTHROUGH or (getattr(func, "__name__", "") == "__get__" and name not in _LINEAR_PROPERTIES):
            return _call_plain(func, args, kwargs)
        if name in _LINEAR_PROPERTIES and getattr(func, "__name__", "") == "__get__":
            func, args = _property(name), args[:1]
        if "out" in kwargs and kwargs["out"] is not None:
            raise UnsupportedOperationError(f"{name}(out=...) on a decomposed tensor in {self.where()}")
        inplace = self._out_of_place(func, name, args, kwargs)
        if inplace is not None:
            return self._inplace(*inplace, args)
        return self._apply(func, name, args, kwargs)

    def _apply(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        streams = streams_in((args, kwargs))
        owners = {s._fl_owner for s in streams}
        if self.local_bias and len(owners) == 1 and None not in owners:
            owner = owners.pop()
            out = _call_plain(func, args, kwargs)
            if not (carries_values(out) if isinstance(out, torch.Tensor)
                    else isinstance(out, tuple | list) and any(carries_values(t) for t in out)):
                self.note_dropped(name, streams)
            return _wrap(out, lambda t: Stream.single(t, owner))
        total = _call_shapes(func, args, kwargs, self.device) if self.shapes_only else _call_plain(func, args, kwargs)
        leaves = [total] if isinstance(total, torch.Tensor) else tree_flatten(total)[0]
        if not any(carries_values(t) for t in leaves):
            # comparisons, indices, integer casts: piecewise constant, so constants at the operating point
            self.note_dropped(name, streams)
            return self._constant(total)
        rule = self.rules.lookup(func, name)
        if rule is None:
            raise UnsupportedOperationError(
                f"no LMD rule for op '{name}' in {self.where()}; register one with "
                "fusionlens.decompose.register_rule"
            )
        self._carried = None
        parts = rule(self, func, args, kwargs, total)
        carried, self._carried = self._carried, None
        if parts is None:  # the rule declared the output a constant at the operating point
            self.note_dropped(name, streams)
            return self._constant(total)
        reach = 0
        for s in carried if carried is not None else streams:
            reach |= s._fl_reach
        return _attach(total, parts, reach)

    def _constant(self, total: Any) -> Any:
        value = self.coefficient(lambda: total, like=total)
        if self.broadcast:  # expanded views handed to the model: give it ordinary tensors to write into
            value = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, value)
        return value

    def _out_of_place(self, func: Callable, name: str, args: tuple, kwargs: dict) -> tuple | None:
        if kwargs.get("inplace"):
            return func, name, args, {**kwargs, "inplace": False}
        if name == "__setitem__":
            return _setitem_out, "_setitem_out", args, kwargs
        if name in _INPLACE_DUNDERS:
            twin = _INPLACE_DUNDERS[name]
            return getattr(torch.Tensor, twin), twin, args, kwargs
        if name.endswith("_") and not name.startswith("_") and args and isinstance(args[0], torch.Tensor):
            if name == "copy_":
                return _copy_out, "_copy_out", args, kwargs
            twin = getattr(torch.Tensor, name[:-1], None)
            if twin is None:
                raise UnsupportedOperationError(f"in-place op '{name}' on a decomposed tensor in {self.where()}")
            return twin, name[:-1], args, kwargs
        return None

    def _inplace(self, func: Callable, name: str, args: tuple, kwargs: dict, original_args: tuple) -> Any:
        target = original_args[0]
        result = self._apply(func, name, args, kwargs)
        if not isinstance(result, Stream):  # constant result written into a tensor
            if isinstance(target, Stream):
                raise UnsupportedOperationError(
                    f"in-place '{name}' overwrites a decomposed tensor with a constant in {self.where()}"
                )
            _call_plain(func, args, kwargs)
            return None if name == "_setitem_out" else target
        if isinstance(target, torch.nn.Parameter) or not isinstance(target, torch.Tensor):
            raise UnsupportedOperationError(
                f"in-place '{name}' writes modality data into a parameter in {self.where()}"
            )
        if not result.fl_total().is_meta or unwrap(target).is_meta:  # (a meta operating point has no values)
            unwrap(target).copy_(result.fl_total())
        if not isinstance(target, Stream):
            # A plain buffer received modality data in place (``canvas[idx] = features``): it becomes a stream
            # so the data stays tracked. Python allows the class change because Stream adds no slots.
            target.__class__ = Stream
        target._fl_owner, target._fl_parts, target._fl_blocks = result._fl_owner, result._fl_parts, result._fl_blocks
        target._fl_reach = result._fl_reach
        return None if name == "_setitem_out" else target


def _call_plain(func: Callable, args: tuple, kwargs: dict) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*unwrap(args), **unwrap(kwargs))


# Meta outputs by op and argument metadata: a replay repeats the same ops on the same shapes (every partner,
# every anchor), and some meta kernels are Python reference implementations. Bounded, least recent out first.
_SHAPES: OrderedDict[Any, Any] = OrderedDict()
_SHAPES_CAPACITY = 4096
_HASHABLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _shape_key(func: Callable, leaves: list[Any], spec: Any) -> Any:
    """What a meta kernel sees of a call: the function, the argument structure, each tensor's shape, strides,
    storage offset and dtype, every other argument's value; ``None`` when an argument cannot be part of a key."""
    key: list[Any] = [func, spec]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append((tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, x.layout))
        elif isinstance(x, _HASHABLE):
            key.append((type(x), x))
        else:
            return None
    try:
        hash(tuple(key))
    except TypeError:
        return None
    return tuple(key)


def _call_shapes(func: Callable, args: tuple, kwargs: dict, device: torch.device | None) -> Any:
    """The op's output as meta tensors (shapes and dtypes, nothing computed). An op whose output shape depends on
    values (indexing by a boolean mask -- a constant, so known) runs for real with zeros for the decomposed
    tensors."""
    leaves, spec = tree_flatten((args, kwargs))
    leaves = [_plain_leaf(x) for x in leaves]
    key = _shape_key(func, leaves, spec)
    if key is not None and key in _SHAPES:
        _SHAPES.move_to_end(key)
        return _SHAPES[key]
    try:
        meta_args, meta_kwargs = tree_unflatten([x.to("meta") if isinstance(x, torch.Tensor) else x for x in leaves],
                                                spec)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*meta_args, **meta_kwargs)
    except (NotImplementedError, RuntimeError):
        def zeros(s: Stream) -> Any:
            total = s.fl_total()
            return torch.zeros(total.shape, dtype=total.dtype, device=device) if total.is_meta else total

        a, kw = replace_streams((args, kwargs), zeros)
        return _call_plain(func, a, kw)
    if key is not None:
        _SHAPES[key] = out
        while len(_SHAPES) > _SHAPES_CAPACITY:
            _SHAPES.popitem(last=False)
    return out


def _plain_leaf(x: Any) -> Any:
    return x.fl_total() if isinstance(x, Stream) else x


def _wrap(out: Any, make: Callable[[torch.Tensor], Stream]) -> Any:
    if isinstance(out, torch.Tensor):  # nearly every op: no pytree walk
        return make(out) if carries_values(out) else out
    leaves, spec = tree_flatten(out)
    wrapped = [make(x) if carries_values(x) else x for x in leaves]
    return tree_unflatten(wrapped, spec)


def _attach(total: Any, parts: Any, reach: int) -> Any:
    """Pair each floating tensor of the op's output with its components (``None`` = constant output)."""
    if isinstance(total, torch.Tensor):
        if isinstance(parts, BlockedParts):
            return Stream.multi(total, parts.parts, parts.blocks, reach)
        return total if parts is None else Stream.multi(total, parts, reach=reach)
    total_leaves, spec = tree_flatten(total)
    # rules return one entry per output leaf (a tensor of components or None for a constant leaf)
    parts_leaves = [parts] if isinstance(parts, torch.Tensor) or parts is None else list(parts)
    parts_leaves += [None] * (len(total_leaves) - len(parts_leaves))
    out = [
        Stream.multi(t, p, reach=reach) if p is not None and isinstance(t, torch.Tensor) else t
        for t, p in zip(total_leaves, parts_leaves)
    ]
    return tree_unflatten(out, spec)
