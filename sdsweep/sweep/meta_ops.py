"""Meta kernels, remembered: the output shapes of an aten op on meta tensors, computed once per input shapes.

Most aten ops' meta kernels are Python (torch._refs / torch._prims decompositions with their
broadcasting and stride rules): about half a millisecond each. The estimator's trace of an SDXL
training step dispatches ~50 000 of them, mostly the same few hundred ops on the same shapes (the
UNet repeats its transformer blocks; backward and checkpoint recomputation repeat the forward). An
op that allocates fresh outputs and aliases nothing has outputs whose sizes, strides, dtypes and
storage sizes depend only on its inputs' metadata and its other arguments: `MetaOps` runs the
kernel once per such key and afterwards allocates empty outputs of the remembered layout, which
is all the trace reads of them (values do not exist on meta). Anything else (views, in-place ops,
outputs that share storage or are not laid out as `empty_strided` would lay them, non-meta tensors)
runs the kernel every time, exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch

META = torch.device("meta")
_UNCACHEABLE = object()
_Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None


class MetaOps:
    """`run(func, args, kwargs)`: func(*args, **kwargs), from remembered layouts where that is exact."""

    def __init__(self) -> None:
        self.layouts: dict[tuple, Any] = {}  # key -> list of _Layout per output, or _UNCACHEABLE
        self.functional: dict[Any, bool] = {}

    def run(self, func, args: tuple, kwargs: dict):
        key = self._key(func, args, kwargs)
        layouts = self.layouts.get(key) if key is not None else _UNCACHEABLE
        if layouts is None:
            out = func(*args, **kwargs)
            self.layouts[key] = _layouts_of(out, (args, tuple(kwargs.values())))
            return out
        if layouts is _UNCACHEABLE:
            return func(*args, **kwargs)
        outs = [None if lay is None else torch.empty_strided(lay[0], lay[1], dtype=lay[2], device=META)
                for lay in layouts[1]]
        return outs[0] if layouts[0] == "one" else tuple(outs) if layouts[0] == "tuple" else outs

    def _key(self, func, args: tuple, kwargs: dict) -> tuple | None:
        """A hashable summary of everything the op's output layout can depend on, or None (run it)."""
        functional = self.functional.get(func)
        if functional is None:
            functional = self.functional[func] = _is_functional(func)
        if not functional:
            return None
        try:
            return (func, _summary(args), _summary(tuple(sorted(kwargs.items()))) if kwargs else ())
        except _NotMeta:
            return None


class _NotMeta(Exception):
    pass


def _summary(value: Any) -> Any:
    """Tensors by layout (meta only), containers recursively, scalars with their type: 2 and 2.0 and
    True compare equal in Python but promote differently."""
    if isinstance(value, torch.Tensor):
        if value.device != META:
            raise _NotMeta
        return ("T", value.shape, value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (tuple, list)):
        return (type(value), *[_summary(v) for v in value])  # a list: cheaper than a generator here
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _NotMeta
    return (type(value), value)


def _is_functional(func) -> bool:
    """Nothing mutated or aliased, and only tensors returned."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    if any(a.alias_info is not None for a in schema.arguments):
        return False
    return bool(schema.returns) and all(
        r.alias_info is None and str(r.type) in ("Tensor", "Tensor?", "Tensor[]") for r in schema.returns)


def _layouts_of(out: Any, inputs: tuple) -> Any:
    """("one" | "tuple" | "list", [layout per output]) when empty_strided reproduces every output's
    storage exactly (fresh, unshared, no offset, no spare bytes); else _UNCACHEABLE."""
    kind = "one" if isinstance(out, torch.Tensor) else "tuple" if isinstance(out, tuple) else "list"
    outs = [out] if kind == "one" else list(out) if isinstance(out, (tuple, list)) else None
    if outs is None:
        return _UNCACHEABLE
    inputs = {t.untyped_storage()._cdata for t in _tensors(inputs)}
    seen: set[int] = set()
    layouts: list[_Layout] = []
    for t in outs:
        if t is None:
            layouts.append(None)
            continue
        if not isinstance(t, torch.Tensor) or t.device != META or t.storage_offset() != 0:
            return _UNCACHEABLE
        storage = t.untyped_storage()._cdata
        if storage in inputs or storage in seen:
            return _UNCACHEABLE
        seen.add(storage)
        remade = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=META)
        if remade.untyped_storage().nbytes() != t.untyped_storage().nbytes():
            return _UNCACHEABLE
        layouts.append((tuple(t.shape), t.stride(), t.dtype))
    return kind, layouts


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
