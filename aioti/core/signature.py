"""What a model expects of its inputs, and the check that enforces it before every run.

A compiled model does not check its inputs by default: a wrong size or stride is read as if it
were right (a silent wrong result or a crash), and its own opt-in check
(`AOTI_RUNTIME_CHECK_INPUTS`) rejects batch 1 on dims exported with `min=1`. aioti therefore
checks in Python, from a signature read off the wrapper source that every `.pt2` ships beside
the library: the generated `check_input_N` functions give dtype, static sizes and strides, and
dynamic ranges (the device is the container's); the generated `assert_size_stride` calls (torch
2.13) give rank, which dims share a symbol, and the stride of every dim as an expression of the
sizes. Libraries without those calls (torch 2.11) get rank from the highest dim the checks
mention, symbols from the `sN = x_size[d]` definitions, and a dynamic dim that defines no symbol
is bound to the one defined symbol with the same range at the same dim (the compiled code reads
only defined symbols, so such a dim must equal one of them).

Dynamic ranges: export's 0/1 specialization makes the generated lower bound 2 for a dim exported
with `min=1`; the compiled code is generic in that dim, so a lower bound of 2 is taken as 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError

__all__ = ["InputSpec", "Layout", "Signature", "constant_shapes", "embeds_weights", "input_labels",
           "parse_signature"]

_NAME = re.compile(r'inputs_info_\[(\d+)\]\.name = "(\w+)";')
_CHECK = re.compile(r"static void check_input_(\d+)\(")
_DTYPE = re.compile(r"(\w+)_expected_dtype = aoti_torch_dtype_(\w+)\(\)")
_LOW = re.compile(r"if \((\w+)_size\[(\d+)\] < (-?\d+)\)")
_HIGH = re.compile(r"if \((\w+)_size\[(\d+)\] > (-?\d+)\)")
_ASSERT = re.compile(r'assert_size_stride\((\w+), \{([^}]*)\}, \{([^}]*)\}, "input"\)')
_STATIC = re.compile(r"if \((-?\d+) != (\w+)_(size|stride)\[(\d+)\]\)")
_SYMBOL = re.compile(r"int64_t (s\d+) = (\w+)_size\[(\d+)\];")


@dataclass
class InputSpec:
    """The expectations for one flat input; unknown parts are `None` and not checked."""

    index: int
    name: str
    label: str = ""
    dtype: torch.dtype | None = None
    #: per dim: an int (static size) or a symbol name (dynamic)
    sizes: tuple[int | str, ...] | None = None
    #: per dim: a product of ints and symbols, e.g. ("64*s0", "64", "1"), or None if not simple
    strides: tuple[tuple[int, tuple[str, ...]] | None, ...] | None = None
    ranges: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)

    def describe(self) -> str:
        """e.g. `float32[batch 1..1024, 64]`."""
        if self.sizes is None:
            shape = "?"
        else:
            dims = []
            for d, s in enumerate(self.sizes):
                if isinstance(s, int):
                    dims.append(str(s))
                else:
                    lo, hi = self.ranges.get(d, (None, None))
                    dims.append(f"{s}:{'' if lo is None else lo}..{'' if hi is None else hi}")
            shape = "[" + ", ".join(dims) + "]"
        dt = str(self.dtype).removeprefix("torch.") if self.dtype else "?"
        return f"{dt}{shape}"


def _product(expr: str) -> tuple[int, tuple[str, ...]] | None:
    const, syms = 1, []
    for tok in expr.split("*"):
        tok = tok.strip().removesuffix("L")
        if re.fullmatch(r"-?\d+", tok):
            const *= int(tok)
        elif re.fullmatch(r"[A-Za-z_]\w*", tok):
            syms.append(tok)
        else:
            return None
    return const, tuple(syms)


def _split(body: str) -> list[str]:
    return [t.strip() for t in body.split(",") if t.strip()]


class Layout:
    """An input layout (dtype, shape, strides, device per input) that passed the full check:
    one object per layout, so callers can key facts of their own by it (hashed by identity).
    `guard` matches inputs of this layout in one native call (`_guard`), None where torch has
    no such check."""

    __slots__ = ("guard",)

    def __init__(self, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.guard: Any = _guard(tensors) if tensors else None


def _load_guards() -> Any:
    """torch's native tensor check (`torch._C._dynamo.guards.TensorGuards`, dynamo's tensor
    match), if this torch has it and it behaves as relied on here: None otherwise, and every
    check takes the layout key."""
    try:
        from torch._C._dynamo import guards

        TensorGuards: Any = guards.TensorGuards  # its stub does not say the tensors it takes
        t = torch.zeros(2, 3)
        g = TensorGuards(t, dynamic_dims_sizes=[[2, 3]], dynamic_dims_strides=[[3, 1]])
        if g.check(t) and not any(g.check(u) for u in (
                t.t(), t[:1], t.double(), torch._neg_view(t), t.to("meta"))):
            return TensorGuards
    except Exception:  # noqa: BLE001 - a private API: any surprise means "not here"
        pass
    return None


_TensorGuards: Any = _load_guards()


_TENSOR, _STRIDED = torch.Tensor, torch.strided


def _dense(tensors: Sequence[object]) -> bool:
    """Whether every one is a plain dense tensor, the only kind handed to the native guard:
    it reads sizes and strides before it compares, which aborts the process for a nested
    tensor (seen with torch 2.13)."""
    for t in tensors:
        if type(t) is not _TENSOR or t.layout is not _STRIDED or t.is_nested:
            return False
    return True


def _guard(tensors: Sequence[torch.Tensor]) -> Any:
    """A native check that passes tensors of exactly these tensors' dtypes, devices, sizes,
    strides, dispatch keys (the negative and conjugate bits among them) and requires_grad."""
    if _TensorGuards is None or not _dense(tensors):
        return None
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except Exception:  # noqa: BLE001 - a layout it cannot describe takes the key
        return None


@dataclass
class Signature:
    """The input specs of one model, in flat input order, and the check over them."""

    inputs: list[InputSpec]
    #: True when the wrapper source gave every input's sizes (otherwise checks are partial)
    known: bool
    #: input layouts (dtype, shape, strides, device per input) that passed the full check:
    #: services send the same few shapes again and again, and a dict hit is cheaper than checks
    _accepted: dict[tuple[Any, ...], Layout] = field(default_factory=dict, repr=False)
    #: the layout accepted last, matched first by its guard: one native call where building
    #: the key reads a dozen tensor attributes
    _last: Layout | None = field(default=None, repr=False)

    def batch_range(self, dim: int = 0) -> tuple[str, int | None, tuple[bool, ...]] | None:
        """The batch symbol of dim `dim`, its upper bound, and which inputs carry it; None when
        there is none, or no single one. The batch symbol is the dynamic symbol at `dim` that
        appears at no other dim of any input (`x[B, S, 16]`, `mask[B, S]`, `pos[S, 16]`: B, not
        S); inputs without it at `dim` are passed through unbatched."""
        at_dim = {s.sizes[dim] for s in self.inputs
                  if s.sizes and len(s.sizes) > dim and isinstance(s.sizes[dim], str)}
        elsewhere = {size for s in self.inputs for d, size in enumerate(s.sizes or ())
                     if d != dim and isinstance(size, str)}
        syms = at_dim - elsewhere if len(at_dim) > 1 else at_dim
        if len(syms) != 1:
            return None
        (sym,) = syms
        carries = tuple(bool(s.sizes and len(s.sizes) > dim and s.sizes[dim] == sym)
                        for s in self.inputs)
        highs = [s.ranges.get(dim, (None, None))[1] for s, c in zip(self.inputs, carries) if c]
        known = [h for h in highs if h is not None]
        return str(sym), (min(known) if known else None), carries

    def example(self, device: torch.device | str = "cpu", rows: int = 8) -> list[torch.Tensor]:
        """Inputs that fit: random floats (zeros for other dtypes), each dynamic dim at `rows`
        clipped to its compiled range. Raises `InputError` when the signature is unknown."""
        out = []
        for s in self.inputs:
            if s.sizes is None or s.dtype is None:
                raise InputError(f"input {s.label}: its signature is unknown (no wrapper source)")
            shape = []
            for d, size in enumerate(s.sizes):
                if isinstance(size, int):
                    shape.append(size)
                    continue
                lo, hi = s.ranges.get(d, (None, None))
                shape.append(max(lo or 1, min(rows, hi or rows)))
            t = torch.randn(shape) if s.dtype.is_floating_point else torch.zeros(shape)
            out.append(t.to(dtype=s.dtype, device=device))
        return out

    def check(self, tensors: Sequence[object], device: torch.device, *, full: bool = True
              ) -> Layout | None:
        """Raise `InputError` for the first input that does not fit; `full=False` checks counts.
        Returns the inputs' `Layout` once fully checked (the same object for the same layout);
        None when unchecked."""
        if len(tensors) != len(self.inputs):
            names = ", ".join(s.label for s in self.inputs)
            raise InputError(
                f"wrong number of inputs: expected {len(self.inputs)}, got {len(tensors)} "
                f"(the model takes {names})"
            )
        if not full:
            return None
        last = self._last
        if last is not None:
            if len(tensors) == 1:  # `_dense`, inline for the common case
                t = tensors[0]
                if (type(t) is _TENSOR and t.layout is _STRIDED and not t.is_nested
                        and last.guard.check(t)):
                    return last
            elif _dense(tensors) and last.guard.check(*tensors):
                return last
        try:
            if len(tensors) == 1:
                t = tensors[0]
                key: tuple[Any, ...] | None = (  # only a complex tensor can be conjugated
                    t.dtype, t.shape, t.stride(), t.device, t.is_neg(),  # type: ignore[attr-defined]
                    t.dtype.is_complex and t.is_conj())  # type: ignore[attr-defined]
            else:
                key = tuple([(t.dtype, t.shape, t.stride(), t.device, t.is_neg(),  # type: ignore[attr-defined]
                              t.dtype.is_complex and t.is_conj()) for t in tensors])  # type: ignore[attr-defined]
        except (AttributeError, TypeError, RuntimeError):  # not tensors; sparse, nested: checked
            key = None
        if key is not None and (layout := self._accepted.get(key)) is not None:
            if layout.guard is not None:
                self._last = layout
            return layout
        bound: dict[str, tuple[int, str]] = {}
        for spec, t in zip(self.inputs, tensors):
            _check_one(spec, t, device, bound)
        if key is None:
            return None
        if len(self._accepted) >= 1024:
            self._accepted.clear()
        layout = self._accepted[key] = Layout(tensors)  # type: ignore[arg-type]
        if layout.guard is not None:
            self._last = layout
        return layout


def _check_one(
    spec: InputSpec, t: object, device: torch.device, bound: dict[str, tuple[int, str]]
) -> None:
    where = f"input {spec.label}"
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if spec.dtype is not None and t.dtype != spec.dtype:
        raise InputError(f"{where}: expected dtype {spec.dtype}, got {t.dtype}")
    if t.device != device and not (device.index is None and t.device.type == device.type):
        raise InputError(f"{where}: expected a tensor on {device}, got one on {t.device}")
    if t.is_nested:
        raise InputError(f"{where}: expected a dense tensor (torch.strided), got a nested tensor")
    if t.layout != torch.strided:
        raise InputError(f"{where}: expected a dense tensor (torch.strided), got {t.layout}")
    if t.is_neg() or t.is_conj():
        bit, fix = ("negative", "resolve_neg") if t.is_neg() else ("conjugate", "resolve_conj")
        raise InputError(
            f"{where}: the tensor has its {bit} bit set (a lazy view: the compiled model reads "
            f"the raw storage and would ignore it, a silently wrong result); pass .{fix}()")
    if spec.sizes is None:
        return
    shape = t.shape
    if len(shape) != len(spec.sizes):
        raise InputError(
            f"{where}: expected {len(spec.sizes)} dims ({spec.describe()}), "
            f"got {len(shape)} (shape {tuple(shape)})"
        )
    for d, (want, got) in enumerate(zip(spec.sizes, shape)):
        if isinstance(want, int):
            if want != got:
                raise InputError(
                    f"{where}: expected size {want} at dim {d} ({spec.describe()}), "
                    f"got {got} (shape {tuple(shape)})"
                )
            continue
        lo, hi = spec.ranges.get(d, (None, None))
        if (lo is not None and got < lo) or (hi is not None and got > hi):
            raise InputError(
                f"{where}: size {got} at dim {d} is outside the compiled range "
                f"{'' if lo is None else lo}..{'' if hi is None else hi} ({spec.describe()}; "
                "the model's compiled code checks this range, which inductor may have narrowed "
                "from the exported one)"
            )
        prev = bound.setdefault(want, (got, f"{spec.label} dim {d}"))
        if prev[0] != got:
            raise InputError(
                f"{where}: expected size {prev[0]} at dim {d} (the same as {prev[1]}), got {got}"
            )
    if spec.strides is None:
        return
    values = {k: v for k, (v, _) in bound.items()}
    strides = t.stride()
    for d, expr in enumerate(spec.strides):
        if expr is None or shape[d] <= 1:
            continue  # a size-1 dim's stride is never used
        const, syms = expr
        if any(s not in values for s in syms):
            continue
        want = const * math.prod(values[s] for s in syms)
        if strides[d] != want:
            raise InputError(
                f"{where}: unexpected strides {tuple(strides)} (expected stride {want} at "
                f"dim {d}; the model reads inputs in its exported layout - pass .contiguous())"
            )


def parse_signature(
    source: str | None, num_inputs: int, labels: Sequence[str] | None = None
) -> Signature:
    """Read the input signature off a model's wrapper source (`*.wrapper.cpp`)."""
    specs = [InputSpec(i, f"input{i}") for i in range(num_inputs)]
    for i, spec in enumerate(specs):
        spec.label = _label(i, spec.name, labels)
    if not source:
        return Signature(specs, known=False)
    by_var: dict[str, InputSpec] = {}
    for m in _NAME.finditer(source):
        i = int(m.group(1))
        if i < num_inputs:
            specs[i].name = m.group(2)
            specs[i].label = _label(i, m.group(2), labels)
            by_var[m.group(2)] = specs[i]
    for m in _DTYPE.finditer(source):
        found = by_var.get(m.group(1))
        dt = getattr(torch, m.group(2), None)
        if found is not None and isinstance(dt, torch.dtype):
            found.dtype = dt
    for pattern, slot in ((_LOW, 0), (_HIGH, 1)):
        for m in pattern.finditer(source):
            found = by_var.get(m.group(1))
            if found is None:
                continue
            d, v = int(m.group(2)), int(m.group(3))
            if slot == 0 and v == 2:
                v = 1  # 0/1 specialization: see the module docstring
            lo_hi = list(found.ranges.get(d, (None, None)))
            lo_hi[slot] = v
            found.ranges[d] = (lo_hi[0], lo_hi[1])
    for m in _ASSERT.finditer(source):
        found = by_var.get(m.group(1))
        if found is None or found.sizes is not None:
            continue
        sizes: list[int | str] = []
        for tok in _split(m.group(2)):
            tok = tok.removesuffix("L")
            sizes.append(int(tok) if re.fullmatch(r"-?\d+", tok) else tok)
        found.sizes = tuple(sizes)
        found.strides = tuple(_product(tok) for tok in _split(m.group(3)))
    if any(s.sizes is None for s in by_var.values()):
        _from_checks(source, by_var)
    return Signature(specs, known=all(s.sizes is not None for s in specs))


def _from_checks(source: str, by_var: dict[str, InputSpec]) -> None:
    """Sizes and strides from the `check_input_N` functions alone (no `assert_size_stride`)."""
    static: dict[tuple[str, str], dict[int, int]] = {}
    for m in _STATIC.finditer(source):
        static.setdefault((m.group(2), m.group(3)), {})[int(m.group(4))] = int(m.group(1))
    defined = {(m.group(2), int(m.group(3))): m.group(1) for m in _SYMBOL.finditer(source)}
    ranges_of_symbols = {sym: (var, d) for (var, d), sym in defined.items()}
    for var, spec in by_var.items():
        if spec.sizes is not None:
            continue
        sizes, strides = static.get((var, "size"), {}), static.get((var, "stride"), {})
        dims = set(sizes) | set(strides) | set(spec.ranges)
        if not dims:
            continue
        out: list[int | str] = []
        for d in range(max(dims) + 1):
            if d in sizes:
                out.append(sizes[d])
            elif (var, d) in defined:
                out.append(defined[(var, d)])
            else:
                same = [sym for sym, (v2, d2) in ranges_of_symbols.items()
                        if d2 == d and by_var[v2].ranges.get(d2) == spec.ranges.get(d)]
                out.append(same[0] if len(same) == 1 else f"{var}_d{d}")
        spec.sizes = tuple(out)
        spec.strides = tuple((strides[d], ()) if d in strides else None for d in range(len(out)))


def _label(i: int, name: str, labels: Sequence[str] | None) -> str:
    if labels is not None and i < len(labels) and labels[i]:
        return f"{i} ({labels[i]})"
    return f"{i} ({name})"


def input_labels(in_spec: str | None, n: int) -> list[str] | None:
    """`args[0]`, `kwargs['scale']`, ... for each flat input, from the model's input spec."""
    import torch.utils._pytree as pytree

    if not in_spec:
        return None
    try:
        spec = pytree.treespec_loads(in_spec)
    except Exception:
        return None
    if spec.num_leaves != n:
        return None
    tree = pytree.tree_unflatten(list(range(n)), spec)
    labels = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        head = path[0] if path else None
        rest = pytree.keystr(path[1:])
        if getattr(head, "idx", None) == 0:
            labels.append("args" + rest)
        elif getattr(head, "idx", None) == 1:
            labels.append("kwargs" + rest)
        else:
            labels.append(pytree.keystr(path))
    return labels


_CONST_NAME = re.compile(r'constants_info_\[(\d+)\]\.name = "([^"]*)";')
_CONST_SHAPE = re.compile(r"constants_info_\[(\d+)\]\.shape = \{([^}]*)\};")


def constant_shapes(source: str | None) -> dict[str, tuple[int, ...]]:
    """Constant name -> shape, read off the wrapper source (empty when there is none)."""
    if not source:
        return {}
    names = {int(m.group(1)): m.group(2) for m in _CONST_NAME.finditer(source)}
    out = {}
    for m in _CONST_SHAPE.finditer(source):
        i = int(m.group(1))
        try:
            shape = tuple(int(t.removesuffix("L")) for t in _split(m.group(2)))
        except ValueError:
            continue
        if i in names:
            out[names[i]] = shape
    return out


# The model's base class is constructed with `include_weights` last: false when the package was
# compiled with aot_inductor.package_constants_in_so=False.
_INCLUDE_WEIGHTS = re.compile(
    r"AOTInductorModelBase\(\s*\d+,\s*\d+,\s*\d+,\s*device_str,\s*[^,]*cubin_dir[^,]*,\s*"
    r"(true|false)\s*\)")


def embeds_weights(source: str | None) -> bool:
    """Whether the library holds the model's weights, read off the wrapper source (assumed
    when there is no source, or the source does not say)."""
    m = _INCLUDE_WEIGHTS.search(source or "")
    return m is None or m.group(1) == "true"
