"""The proxy executor: how a model runs operators that have no C shim.

A model library calls most operators through libtorch's C shim. For the others (operators made
with `torch.library.custom_op`, some of torch's own such as `aten::linalg_qr`) the compiler
writes the call into the package (`<library>.json`: the operator, and for each argument either
its value or where it comes from) and the library hands it to a *proxy executor* at run time:
`call_function(node, ints, tensors)`, with the node's index, the integers known only at run time
(sizes) and its tensor handles, inputs first, then the outputs to fill.

Torch's loader builds that executor in C++. aioti builds a small C++ object with the same
virtual call (`proxy.cpp`, compiled on first use like every native helper) that calls back into
Python, where `ProxyExecutor` reads each node once at load, and per call puts the arguments
together, calls the operator through `torch.ops` and hands its results back through the output
handles. An operator that raises fails the run (`ModelRunError` with its message); an operator
that cannot be found fails the load, naming it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import subprocess
import threading
from collections.abc import Iterator, Sequence
from ctypes import CFUNCTYPE, POINTER, c_char, c_int, c_int64, c_size_t, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from . import native
from .library import free_handles, handles_from_tensors, new_handle, tensors_from_handles

__all__ = ["ProxyExecutor", "extern_nodes"]

_SOURCE = Path(__file__).with_name("proxy.cpp")
_CALLBACK = CFUNCTYPE(c_int, c_int, c_int, POINTER(c_int64), c_int, POINTER(c_void_p),
                      POINTER(c_char), c_size_t)


@functools.cache
def _helper() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native.build(_SOURCE, "c++", ("-std=c++17",))))
    lib.aioti_proxy_new.argtypes = [_CALLBACK]
    lib.aioti_proxy_new.restype = c_void_p
    lib.aioti_proxy_delete.argtypes = [c_void_p]
    lib.aioti_proxy_delete.restype = None
    return lib


def extern_nodes(path: Path | None) -> list[dict[str, Any]]:
    """The operator calls a model library makes through a proxy executor, from its `.json`
    (none when there is no such file)."""
    if path is None or not path.is_file():
        return []
    try:
        return [entry["node"] for entry in json.loads(path.read_text()).get("nodes", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read the operator calls in {str(path)!r}: {exc}") from exc


# An argument, as read at load: where its value comes from at run time.
#   ("value", v)     v, known at compile time
#   ("tensor", 1)    the next input tensor     ("tensors", n)  the next n, as a list
#   ("int", 1)       the next integer          ("ints", n)     the next n, as a list
#   ("optional_tensors", mask)  a list with the next tensor where mask is True, else None
_Arg = tuple[str, Any]


@dataclass(frozen=True)
class _Node:
    """One operator call: the operator, its arguments by name, what it returns."""

    target: str
    op: Any
    args: dict[str, _Arg]
    #: per return of the schema: ("tensor", n) n tensors, ("int", 1) a checked int, ("none", 0)
    returns: list[_Arg]
    inputs: int  # how many of the tensor handles are inputs (the rest are outputs)


def _static(kind: str, value: Any, device: torch.device) -> Any:
    from torch._export.serde import schema as s
    from torch._export.serde import serialize as ser

    if kind in ("as_float", "as_bool", "as_string", "as_floats", "as_bools", "as_strings"):
        return value
    if kind == "as_scalar_type":
        return ser._SERIALIZE_TO_TORCH_DTYPE[s.ScalarType(value)]
    if kind == "as_layout":
        return ser._SERIALIZE_TO_TORCH_LAYOUT[s.Layout(value)]
    if kind == "as_memory_format":
        return ser._SERIALIZE_TO_TORCH_MEMORY_FORMAT[s.MemoryFormat(value)]
    if kind == "as_device":
        return device  # as torch's executor does: the model's device
    raise KeyError(kind)


def _argument(serialized: dict[str, Any], device: torch.device) -> _Arg:
    """Where an argument's value comes from; the serialized kind decides (as in torch's own
    executor: integers and integer lists are always passed at run time)."""
    ((kind, value),) = serialized.items()
    if kind == "as_none":
        return ("value", None)
    if kind == "as_tensor":
        return ("tensor", 1)
    if kind == "as_tensors":
        return ("tensors", len(value))
    if kind == "as_optional_tensors":
        return ("optional_tensors", tuple(next(iter(v)) == "as_tensor" for v in value))
    if kind in ("as_int", "as_sym_int"):
        return ("int", 1)
    if kind in ("as_ints", "as_sym_ints"):
        return ("ints", len(value))
    return ("value", _static(kind, value, device))


def _returns(schema: Any, outputs: list[dict[str, Any]], target: str) -> list[_Arg]:
    if len(outputs) != len(schema.returns):
        raise ModelLoadError(f"operator {target}: the package names {len(outputs)} outputs, "
                             f"its schema {len(schema.returns)} ({schema})")
    out: list[_Arg] = []
    for ret, serialized in zip(schema.returns, outputs):
        ((kind, value),) = serialized.items()
        rtype = ret.real_type
        if rtype.kind() == "NoneType" or kind == "as_none":
            out.append(("none", 0))
        elif kind == "as_tensor":
            out.append(("tensor", 1))
        elif kind == "as_tensors":
            out.append(("tensor", len(value)))
        elif kind == "as_optional_tensor":
            out.append(("tensor", 1) if next(iter(value)) == "as_tensor" else ("none", 0))
        elif kind in ("as_int", "as_sym_int"):
            out.append(("int", 1))
        else:
            raise ModelLoadError(f"operator {target}: aioti cannot return {kind} ({rtype})")
    return out


class _Missing(Exception):
    """An operator this process has not registered."""


def _operator(target: str) -> Any:
    name, _, overload = target.partition(".")
    namespace, _, op = name.partition("::")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")
    except AttributeError as exc:
        raise _Missing(target) from exc


def _read_node(node: dict[str, Any], device: torch.device) -> _Node:
    target = node["target"]
    if target == "call_torchbind" or any("as_custom_obj" in a["arg"] for a in node["inputs"]):
        raise ModelLoadError(f"operator {target}: the model calls methods of TorchBind objects, "
                             "which aioti's proxy executor does not support")
    op = _operator(target)
    args = {}
    for named in node["inputs"]:
        try:
            args[named["name"]] = _argument(named["arg"], device)
        except KeyError as exc:
            raise ModelLoadError(f"operator {target}: aioti cannot pass an argument of kind "
                                 f"{exc} ({named['name']!r})") from exc
    inputs = sum(n if k in ("tensor", "tensors") else sum(n) if k == "optional_tensors" else 0
                 for k, n in args.values())
    return _Node(target, op, args, _returns(op._schema, node["outputs"], target), inputs)


def _take(arg: _Arg, ints: Iterator[int], tensors: Iterator[torch.Tensor]) -> Any:
    kind, n = arg
    if kind == "value":
        return n
    if kind == "tensor":
        return next(tensors)
    if kind == "tensors":
        return [next(tensors) for _ in range(n)]
    if kind == "optional_tensors":
        return [next(tensors) if present else None for present in n]
    if kind == "int":
        return next(ints)
    return [next(ints) for _ in range(n)]


def _fill(destination: int, tensor: torch.Tensor) -> None:
    """Make the output handle `destination` (a heap `at::Tensor`, one pointer to its
    TensorImpl) hold `tensor`: the two handles swap their pointers, and the new handle, now
    holding what `destination` held (an undefined tensor), is freed."""
    (source,) = handles_from_tensors([tensor])
    a, b = c_void_p.from_address(destination), c_void_p.from_address(source)
    a.value, b.value = b.value, a.value
    free_handles([source])


class ProxyExecutor:
    """The proxy executor of one model container, for the operator calls in `nodes`."""

    def __init__(self, nodes: Sequence[dict[str, Any]], device: torch.device) -> None:
        missing, read = [], []
        for node in nodes:
            try:
                read.append(_read_node(node, device))
            except _Missing:
                custom = node.get("metadata", {}).get("torch_library_custom_op") == "1"
                missing.append(node["target"] + (" (a torch.library.custom_op)" if custom else ""))
        if missing:
            raise ModelLoadError(
                "the model calls operators this process does not have: "
                f"{', '.join(sorted(set(missing)))}; import the module that defines them (it "
                "registers them with torch.library) before loading the model")
        self.nodes = read
        self._local = threading.local()
        self._callback = _CALLBACK(self._call)  # kept: the native object calls it
        try:
            self.address: int | None = _helper().aioti_proxy_new(self._callback)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ModelLoadError(
                f"the model calls {len(read)} operator(s) without a C shim "
                f"({', '.join(sorted({n.target for n in read}))}), which run through a proxy "
                f"executor that aioti builds with a C++ compiler: {exc}") from exc

    @property
    def targets(self) -> list[str]:
        """The operators the model calls through this executor."""
        return sorted({n.target for n in self.nodes})

    def take_error(self) -> tuple[str, BaseException] | None:
        """This thread's last failed operator call (cleared): what failed, and the exception."""
        error, self._local.error = getattr(self._local, "error", None), None
        return error

    def close(self) -> None:
        """Free the native object; no run may be in flight."""
        if self.address is not None:
            _helper().aioti_proxy_delete(self.address)
            self.address = None

    def _call(self, index: int, num_ints: int, ints: Any, num_tensors: int, handles: Any,
              error: Any, error_size: int) -> int:
        try:
            self._run(self.nodes[index], ints[:num_ints], handles[:num_tensors])
            return 0
        except BaseException as exc:  # never into the native frames above
            node = self.nodes[index].target if 0 <= index < len(self.nodes) else index
            text = f"operator {node} raised {type(exc).__name__}: {exc}"
            self._local.error = (text, exc)
            data = text.encode()[:error_size]
            ctypes.memmove(error, data, len(data))
            return 1

    def _run(self, node: _Node, ints: list[int], handles: list[int]) -> None:
        inputs = tensors_from_handles([new_handle(h) for h in handles[:node.inputs]])
        int_args, tensor_args = iter(ints), iter(inputs)
        kwargs = {name: _take(arg, int_args, tensor_args) for name, arg in node.args.items()}
        result = node.op(**kwargs)
        results = [result] if len(node.returns) == 1 else list(result)
        outputs = iter(handles[node.inputs:])
        for (kind, n), value in zip(node.returns, results):
            if kind == "tensor":
                for tensor in (value if n != 1 or isinstance(value, (list, tuple)) else [value]):
                    _fill(next(outputs), tensor)
            elif kind == "int" and value != next(int_args):
                raise RuntimeError(f"{node.target} returned {value}, the model was compiled "
                                   "for another value")
