"""The synchronous model container: runs, metadata and constants over one `ModelLibrary`.

A `Container` may be used from many threads at once, as the native container is: runs on up to
`num_models` threads proceed in parallel. Constant *mutations* are not synchronized against runs
by the native code (an update of the active buffer races with runs): callers serialize them, as
the async facade does with its mutation lock and run gate. Constant operations are serialized
with each other and with `delete` here: a deletion waits for the one in progress, and one that
comes after it raises `ClosedError` (deleting the native container under it would crash).

Ownership across the boundary:
- `run` makes a new owning handle per input; the native `Run` steals (frees) them.
- the output handles `Run` writes are owned by the caller and become tensors at once; if a run
  fails after writing some of them, those are freed.
- constant updates pass borrowed handles; aioti frees them after a copying update, and keeps them
  (with their tensors) alive for as long as the container may use them after a user-managed one.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from ctypes import byref, c_bool, c_char_p, c_int32, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from ..errors import InputError, ModelLoadError, ModelRunError, UnsupportedOperation
from . import runmany
from .library import (
    ConstantEntry,
    ModelLibrary,
    free_handles,
    handles_from_tensors,
    new_handle,
    tensors_from_handles,
)
from .signature import Signature, constant_shapes, input_labels, parse_signature

__all__ = ["ConstantInfo", "Container", "scalar_type"]

# c10::ScalarType numbering, which `aoti_torch_dtype_*()` returns.
_SCALAR_TYPES: dict[int, torch.dtype] = {
    0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
    5: torch.float16, 6: torch.float32, 7: torch.float64, 9: torch.complex64,
    10: torch.complex128, 11: torch.bool, 15: torch.bfloat16,
}
for _code, _name in ((23, "float8_e5m2"), (24, "float8_e4m3fn")):
    if hasattr(torch, _name):
        _SCALAR_TYPES[_code] = getattr(torch, _name)


def scalar_type(code: int) -> torch.dtype | None:
    """The torch dtype of a c10 ScalarType code (None for codes aioti does not map)."""
    return _SCALAR_TYPES.get(code)


@dataclass(frozen=True)
class ConstantInfo:
    """One constant of the compiled model."""

    name: str
    fqn: str
    dtype: torch.dtype | None
    nbytes: int
    from_folded: bool
    kind: int  # torch::aot_inductor::ConstantType: 1 Parameter, 2 Buffer, 3 TensorConstant


F = TypeVar("F", bound=Callable[..., Any])


def _holding(method: F) -> F:
    """A constant operation, run holding the container against deletion (see the module doc)."""

    @functools.wraps(method)
    def held(self: Container, *args: Any, **kwargs: Any) -> Any:
        with self._ops:
            return method(self, *args, **kwargs)

    return cast(F, held)


class Container:
    """A native model container. Create it, `run` it, and `delete` it when done.

    `device` is a device string ("cpu", "cuda:1"); `num_models` the number of model instances
    that may run at once; `single_threaded` uses `RunSingleThreaded`, for callers that never
    run concurrently; `check_inputs` makes `run` validate inputs against the model's signature.
    """

    def __init__(
        self,
        library: ModelLibrary,
        *,
        device: str | torch.device = "cpu",
        num_models: int = 1,
        cubin_dir: str | os.PathLike[str] | None = None,
        single_threaded: bool = False,
        check_inputs: bool = True,
        source: str | None = None,
        constants_loaded: bool = True,
    ) -> None:
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        self.library = library
        self.device = torch.device(device)
        self.num_models = num_models
        self.check_inputs = check_inputs
        handle = c_void_p()
        cubin = str(cubin_dir).encode() if cubin_dir is not None else None
        library.call("CreateWithDevice", byref(handle), num_models, str(self.device).encode(), cubin)
        self._handle: int | None = handle.value
        self._ops = threading.RLock()  # held by constant operations and by `delete`
        self._kept: list[dict[str, tuple[torch.Tensor, int]]] = [{}, {}]  # per buffer
        self._active = 0
        self._inactive_complete = False
        self._blobs: list[object] = []
        self._constants_loaded = constants_loaded
        # With AOTI_RUNTIME_CHECK_INPUTS set, the library checks inputs *before* it takes them
        # over; a rejected run then leaves the input handles to us (see run_tensors).
        self._native_checks = os.environ.get("AOTI_RUNTIME_CHECK_INPUTS", "")[:1] not in ("", "0")
        self._run_fn = library.functions[
            "RunSingleThreaded" if single_threaded and library.has("RunSingleThreaded") else "Run"
        ]
        self._run_address: int = ctypes.cast(self._run_fn, c_void_p).value  # type: ignore[assignment]
        # The native run loop, built (once per machine) or found here, not in the first run.
        self._run_many_fn = runmany.runner()
        self.num_inputs = self._count("GetNumInputs")
        self.num_outputs = self._count("GetNumOutputs")
        self._in_array = c_void_p * self.num_inputs
        self._out_array = c_void_p * self.num_outputs
        self.input_names = self._names("GetInputName", self.num_inputs)
        self.output_names = self._names("GetOutputName", self.num_outputs)
        self.call_spec = self._call_spec()
        self.constants = self._constants()
        self._by_name = {c.name: c for c in self.constants}
        self._by_fqn = {c.fqn: c for c in self.constants if c.fqn}
        labels = input_labels(self.call_spec[0] if self.call_spec else None, self.num_inputs)
        self.signature: Signature = parse_signature(source, self.num_inputs, labels)
        if check_inputs and not self.signature.known:
            unread = ", ".join(s.label for s in self.signature.inputs if s.sizes is None)
            why = ("no wrapper source came with the library" if not source else
                   f"aioti could not read the shapes of {unread} from the wrapper source (code "
                   "generated by a torch version it does not recognise?)")
            warnings.warn(f"input checks are partial for this model: {why}; input counts, "
                          "types, devices and any dtypes read are still checked",
                          RuntimeWarning, stacklevel=2)
        #: constant name -> shape where the wrapper source says (else sizes are checked in bytes)
        self.constant_shapes = constant_shapes(source)
        # Per buffer: may it hold runtime-folded constants? The active one does once a run has
        # folded it (the first run does). See `free_inactive_constant_buffer`.
        # (A library that cannot say which constants are folded is taken to fold.)
        self._folds = any(c.from_folded for c in self.constants) or not library.has(
            "GetConstantFromFolded")
        self._holds_folded = [self._folds, False]

    # --- metadata ------------------------------------------------------------------------

    def _count(self, fn: str) -> int:
        n = c_size_t()
        self.library.call(fn, self._live(), byref(n))
        return n.value

    def _names(self, fn: str, n: int) -> list[str]:
        if not self.library.has(fn):
            return [f"{fn[3:7].lower()}{i}" for i in range(n)]
        out = []
        for i in range(n):
            s = c_char_p()
            self.library.call(fn, self._live(), i, byref(s))
            out.append((s.value or b"").decode())
        return out

    def _call_spec(self) -> tuple[str, str] | None:
        if not self.library.has("GetCallSpec"):
            return None
        a, b = c_char_p(), c_char_p()
        self.library.call("GetCallSpec", self._live(), byref(a), byref(b))
        return (a.value or b"").decode(), (b.value or b"").decode()

    def _constants(self) -> list[ConstantInfo]:
        if not self.library.has("GetNumConstants"):
            return []
        out = []
        h = self._live()
        for i in range(self._count("GetNumConstants")):
            name, fqn = c_char_p(), c_char_p()
            folded, kind, dtype, size = c_bool(), c_int32(), c_int32(-1), c_size_t()
            self.library.call("GetConstantName", h, i, byref(name))
            if self.library.has("GetConstantOriginalFQN"):
                self.library.call("GetConstantOriginalFQN", h, i, byref(fqn))
            if self.library.has("GetConstantFromFolded"):
                self.library.call("GetConstantFromFolded", h, i, byref(folded))
            if self.library.has("GetConstantType"):
                self.library.call("GetConstantType", h, i, byref(kind))
            if self.library.has("GetConstantDtype"):
                self.library.call("GetConstantDtype", h, i, byref(dtype))
            if self.library.has("GetConstantDataSize"):
                self.library.call("GetConstantDataSize", h, i, byref(size))
            out.append(ConstantInfo(
                name=(name.value or b"").decode(), fqn=(fqn.value or b"").decode(),
                dtype=scalar_type(dtype.value), nbytes=size.value,
                from_folded=folded.value, kind=kind.value,
            ))
        return out

    @property
    def constant_fqns(self) -> dict[str, str]:
        """Internal constant name -> original FQN (the `state_dict` key), folded ones excluded."""
        return {c.name: c.fqn for c in self.constants if not c.from_folded}

    @property
    def constant_dtypes(self) -> dict[str, torch.dtype | None]:
        return {c.name: c.dtype for c in self.constants}

    @property
    def constant_sizes(self) -> dict[str, int]:
        """Internal constant name -> size in bytes."""
        return {c.name: c.nbytes for c in self.constants}

    @property
    def folded_constants(self) -> dict[str, bool]:
        return {c.name: c.from_folded for c in self.constants}

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self) -> int:
        h = self._handle
        if h is None:
            from ..errors import ClosedError

            raise ClosedError("the model container was deleted")
        return h

    def _need(self, fn: str, what: str) -> None:
        if not self.library.has(fn):
            built = self.library.torch_version or "an older torch"
            raise UnsupportedOperation(
                f"{what} needs AOTInductorModelContainer{fn}, which this model library lacks "
                f"(built by {built}; this process runs torch {torch.__version__})"
            )

    # --- runs ------------------------------------------------------------------------------

    def run(
        self, inputs: Sequence[torch.Tensor], *, stream: int | None = None,
        check: bool | None = None,
    ) -> list[torch.Tensor]:
        """Run once on flat `inputs`; returns the flat outputs (owned by the caller)."""
        self.signature.check(inputs, self.device, full=self.check_inputs if check is None else check)
        return self.run_tensors(inputs, stream)

    def boxed_run(
        self, inputs: list[torch.Tensor], *, stream: int | None = None, check: bool | None = None
    ) -> list[torch.Tensor]:
        """Like `run`, but takes the inputs over: `inputs` is emptied before the run starts,
        so their memory can be released as soon as the model is done with them."""
        self.signature.check(inputs, self.device, full=self.check_inputs if check is None else check)
        tensors = list(inputs)
        inputs.clear()
        return self.run_tensors(tensors, stream)

    def run_tensors(self, tensors: Sequence[torch.Tensor], stream: int | None = None
                    ) -> list[torch.Tensor]:
        """Run on already checked tensors (the runtime's worker path)."""
        if not self._native_checks:
            return self._run(handles_from_tensors(tensors), stream)
        (out,) = self.run_many([tensors], stream)
        if isinstance(out, Exception):
            raise out
        return out

    def run_many(self, batch: Sequence[Sequence[torch.Tensor]], stream: int | None = None
                 ) -> list[list[torch.Tensor] | Exception]:
        """Run once per entry of `batch` (already checked inputs), in order, on one stream: each
        run's outputs, or the exception it raised (a failed run does not stop the others).

        Handles are made and taken back for the whole batch at once, and with the native helper
        (`runmany`) every run goes in one GIL-free call."""
        self._live()  # a closed container raises before any handle is made
        n_in, n_out = self.num_inputs, self.num_outputs
        results: list[Any] = [None] * len(batch)
        runs = []
        for i, ts in enumerate(batch):
            if len(ts) == n_in:  # the library would throw through its C ABI
                runs.append(i)
            else:
                results[i] = InputError(f"wrong number of inputs: expected {n_in}, got {len(ts)}")
        tensors = [t for i in runs for t in batch[i]]
        if self._native_checks:
            # The library checks inputs before it takes them over: hand it aliases, so that a
            # handle it did not take can be told apart afterwards (its alias is referenced twice).
            tensors = [t.detach() for t in tensors]
        count = len(runs)
        ins = (c_void_p * (count * n_in))(*handles_from_tensors(tensors))
        outs = (c_void_p * (count * n_out))()
        failed: dict[int, Exception] = {}
        start = 0
        while start < count:
            code, done = self._run_span(ins, outs, start, count, stream)
            if not code:
                break
            bad = start + done  # its outputs may be partly written
            failed[bad] = ModelRunError(self.library.describe_failure("Run", code))
            free_handles(outs[bad * n_out:(bad + 1) * n_out])
            if self._native_checks:
                free_handles([ins[j] for j in range(bad * n_in, (bad + 1) * n_in)
                              if tensors[j]._use_count() > 1])  # type: ignore[attr-defined]
            start = bad + 1
        ok = [k for k in range(count) if k not in failed]
        handles: list[Any] = list(outs) if not failed else [
            outs[k * n_out + j] for k in ok for j in range(n_out)]
        made = tensors_from_handles(handles)
        for m, k in enumerate(ok):
            results[runs[k]] = made[m * n_out:(m + 1) * n_out]
        for k, exc in failed.items():
            results[runs[k]] = exc
        return results

    def _run_span(self, ins: ctypes.Array[c_void_p], outs: ctypes.Array[c_void_p], start: int,
                  count: int, stream: int | None) -> tuple[int, int]:
        """Runs `start`..`count-1` of the handle arrays, stopping at the first failure: its code
        (0: none failed) and how many ran before it."""
        n_in, n_out = self.num_inputs, self.num_outputs
        width = ctypes.sizeof(c_void_p)
        native = self._run_many_fn
        if native is not None:
            done = c_size_t()
            code = native(self._run_address, self._live(),
                          ctypes.addressof(ins) + start * n_in * width, n_in,
                          ctypes.addressof(outs) + start * n_out * width, n_out,
                          count - start, stream, byref(done))
            return code, done.value
        for k in range(start, count):
            code = self._run_fn(
                self._live(), self._in_array.from_buffer(ins, k * n_in * width), n_in,
                self._out_array.from_buffer(outs, k * n_out * width), n_out, stream, None)
            if code:
                return code, k - start
        return 0, count - start

    def _run(self, handles: list[int], stream: int | None) -> list[torch.Tensor]:
        """Run on owning input handles (taken over by the library once it starts the run)."""
        if len(handles) != self.num_inputs:  # the library would throw through its C ABI
            free_handles(handles)
            raise InputError(f"wrong number of inputs: expected {self.num_inputs}, got {len(handles)}")
        outs = self._out_array()
        code = self._run_fn(self._live(), self._in_array(*handles), len(handles),
                            outs, self.num_outputs, stream, None)
        if code:
            message = self.library.describe_failure("Run", code)
            free_handles(list(outs))
            raise ModelRunError(message)
        return tensors_from_handles(list(outs))

    # --- constants ---------------------------------------------------------------------------

    def resolve_constants(
        self, mapping: Mapping[str, object], *, private: bool = False
    ) -> dict[str, torch.Tensor]:
        """Map internal names or FQNs to checked, compact tensors on the model's device
        (`private=True`: always copies the caller cannot touch).

        Raises `InputError` before anything changes for an unknown key, a folded constant, a
        non-tensor, a sparse or meta tensor, or a dtype or shape that differs from the model's.
        """
        out: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in mapping.items():
            info = self._by_name.get(key) or self._by_fqn.get(key)
            if info is None or info.from_folded:
                unknown.append(key)
                continue
            if not isinstance(value, torch.Tensor):
                raise InputError(
                    f"constant {key!r}: expected a torch.Tensor, got {type(value).__name__}"
                )
            if info.dtype is not None and value.dtype != info.dtype:
                raise InputError(
                    f"constant {key!r}: expected dtype {info.dtype}, got {value.dtype}"
                )
            if value.layout != torch.strided or value.is_meta:
                what = "a meta tensor (no data)" if value.is_meta else f"layout {value.layout}"
                raise InputError(f"constant {key!r}: expected a dense tensor with data, got {what}")
            nbytes = value.numel() * value.element_size()
            shape = self.constant_shapes.get(info.name)
            if shape is not None and tuple(value.shape) != shape:
                raise InputError(
                    f"constant {key!r}: expected shape {shape}, got {tuple(value.shape)}"
                )
            # Without a known shape: data sizes are padded to 64 bytes by the compiler.
            if shape is None and not (0 <= info.nbytes - nbytes < 64):
                raise InputError(
                    f"constant {key!r}: expected about {info.nbytes} bytes of {info.dtype}, "
                    f"got shape {tuple(value.shape)} ({nbytes} bytes)"
                )
            # The native copy reads `storage size` bytes from the data pointer: hand it a
            # compact tensor of its own.
            t = value.detach().to(self.device)
            if private and t.data_ptr() == value.data_ptr() or not (
                t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == nbytes
            ):
                t = t.contiguous().clone()
            out[info.name] = t
        if unknown:
            known = ", ".join(sorted(self.constant_fqns.values()))
            raise InputError(
                f"unknown constant(s) {', '.join(map(repr, unknown))}: not runtime constants of "
                f"this model (folded or inlined at compile time, or misspelt); it has: {known}"
            )
        return out

    def missing_constants(self, names: set[str]) -> list[str]:
        return [c.fqn or c.name for c in self.constants
                if not c.from_folded and c.name not in names]

    @_holding
    def update_constants(
        self,
        mapping: Mapping[str, object],
        *,
        inactive: bool = False,
        validate_full: bool = False,
        user_managed: bool = False,
    ) -> None:
        """Update constants of the active (or inactive) buffer from `mapping`.

        Copying by default. `user_managed=True` makes the model use the given tensors' memory
        directly (no copy; aioti keeps them alive until they are replaced or the model goes).
        Libraries without the copying function (torch 2.11) get a private copy passed as
        user-managed, which behaves like a copying update. Only the constants `mapping` names
        change (see `_carried_over` for the inactive buffer's module buffers).
        """
        copying = not user_managed and self.library.has("UpdateConstantBufferPairs")
        resolved = self.resolve_constants(mapping, private=not copying and not user_managed)
        missing = self.missing_constants(set(resolved))
        if validate_full and missing:
            raise InputError(f"validate_full: constants missing from the mapping: {missing}")
        if inactive and not self._inactive_complete and missing:
            # The inactive buffer holds no complete weight set yet: complete it from the active
            # one, so that a later swap never activates missing constants.
            if not self.library.has("ExtractConstantsMapEntries"):
                raise InputError(
                    "the inactive buffer holds no complete weight set and this library cannot "
                    "extract the active one: the first inactive update must give every constant "
                    f"(missing: {missing})"
                )
            resolved = {**self.extract_constants(), **resolved}
        elif inactive and missing:
            resolved = {**self._carried_over(resolved), **resolved}
        if not resolved:
            return
        if not copying:
            self._need("UpdateUserManagedConstantBufferPairs", "updating constants")
        fn = "UpdateConstantBufferPairs" if copying else "UpdateUserManagedConstantBufferPairs"
        names = list(resolved)
        tensors = [resolved[n] for n in names]
        handles = handles_from_tensors(tensors)
        pairs = (ConstantEntry * len(names))(
            *(ConstantEntry(n.encode(), h) for n, h in zip(names, handles))
        )
        try:
            self.library.call(fn, self._live(), pairs, len(names), inactive, validate_full)
        except BaseException:
            free_handles(handles)
            raise
        # What the buffer uses of ours: the tensors of user-managed updates (a copying update
        # of the same name replaces them, so they go).
        kept = self._kept[self._active ^ int(inactive)]
        replaced = [kept.pop(n)[1] for n in names if n in kept]
        if copying:
            free_handles(handles)
        else:
            kept.update({n: (t, h) for n, t, h in zip(names, tensors, handles)})
        free_handles(replaced)
        if inactive:
            self._inactive_complete = True  # complete by now: checked or completed above

    def update_inactive_constants(self, mapping: Mapping[str, object]) -> None:
        """Update the inactive buffer (a shorthand for `update_constants(..., inactive=True)`).

        While the inactive buffer holds no complete weight set (after loading, and after
        `free_inactive_constant_buffer`), constants missing from `mapping` are taken from the
        active buffer, so the buffer a later swap activates is always complete."""
        self.update_constants(mapping, inactive=True)

    @_holding
    def stage_constants(self, mapping: Mapping[str, object]) -> None:
        """Fill the inactive buffer with the *active* buffer's constants updated by `mapping`,
        so that a swap activates the current weights with `mapping` applied (a partial hot
        swap). Constants missing from `mapping` are read from the active buffer: copies kept
        from earlier updates, else extracted; `InputError` if the library cannot do either."""
        named = {info.name for key in mapping
                 if (info := self._by_name.get(key) or self._by_fqn.get(key)) is not None}
        missing = {c.name for c in self.constants if not c.from_folded and c.name not in named}
        current = self._held_values(False, missing, "a partial hot swap must give {} too: this "
                                    "library cannot read the active buffer's constants")
        self.update_constants({**current, **mapping}, inactive=True)

    @_holding
    def extract_constants(self, *, inactive: bool = False, by_fqn: bool = False
                          ) -> dict[str, torch.Tensor]:
        """Copies of the constants of the active (or inactive) buffer, keyed by internal name
        (or by FQN). Folded constants are not included. An empty inactive buffer (after loading
        and after a free) gives {}."""
        self._need("ExtractConstantsMapEntries", "extracting constants")
        if inactive and not self._inactive_complete:
            return {}  # empty: natively, after a free, its entries point into the freed blob
        return {fqn if by_fqn or info is None else info.name: t
                for fqn, info, t in self._extract(inactive)}

    def _extract(self, inactive: bool, only: Collection[str] | None = None
                 ) -> list[tuple[str, ConstantInfo | None, torch.Tensor]]:
        """(FQN, info, copy) of a buffer's constants; with `only`, of those internal names."""
        entries = ctypes.POINTER(ConstantEntry)()
        n = c_size_t()
        self.library.call("ExtractConstantsMapEntries", self._live(), byref(entries), byref(n), inactive)
        picked = []
        for i in range(n.value):
            fqn = (entries[i].name or b"").decode()
            info = self._by_fqn.get(fqn)
            if only is None or info is not None and info.name in only:
                picked.append((fqn, info, new_handle(entries[i].handle)))
        tensors = tensors_from_handles([h for _, _, h in picked])
        return [(fqn, info, t.clone()) for (fqn, info, _), t in zip(picked, tensors)]

    def _carried_over(self, resolved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For a partial update of the complete inactive buffer: its own current values of the
        constants missing from it that torch's container would otherwise replace with the
        active buffer's (module buffers, tensor constants, empty parameters; any of unknown
        kind), so that the update changes only what it names."""
        names = {c.name for c in self.constants if not c.from_folded and c.name not in resolved
                 and (c.kind != 1 or c.nbytes == 0)}
        return self._held_values(True, names, (
            "a partial update of the inactive buffer must give {} too: torch's container would "
            "replace them with the active buffer's, and this library cannot read the inactive "
            "buffer's own"))

    def _held_values(self, inactive: bool, names: set[str], unreadable: str
                     ) -> dict[str, torch.Tensor]:
        """A buffer's current tensors for `names`: those aioti keeps from user-managed updates,
        the others extracted; `InputError(unreadable.format(sorted(others)))` when the library
        cannot extract."""
        kept = self._kept[self._active ^ int(inactive)]
        out = {n: kept[n][0] for n in names if n in kept}
        rest = names - set(out)
        if rest:
            if not self.library.has("ExtractConstantsMapEntries"):
                raise InputError(unreadable.format(sorted(rest)))
            out.update({info.name: t for _, info, t in self._extract(inactive, rest) if info})
        return out

    @_holding
    def run_constant_folding(self, *, inactive: bool = False, stream: int | None = None) -> None:
        """Fold constants of the active (or inactive) buffer; folding the active one waits for
        runs in flight (the native container takes its exclusive lock). A model without runtime
        constant folding has nothing to fold: a no-op. Folding an inactive buffer that holds no
        complete weight set is refused: natively it reads constants that are missing (a
        segfault) or freed."""
        self._need("RunConstantFolding", "constant folding")
        if not self._folds:
            return  # nothing to fold (natively: a warning printed to stderr, nothing else)
        if inactive and not self._inactive_complete:
            raise InputError(
                "fold refused: the inactive buffer holds no complete weight set "
                "(update it first; it is empty after loading and after free_inactive)"
            )
        self.library.call("RunConstantFolding", self._live(), inactive, stream, None)
        self._holds_folded[self._active ^ int(inactive)] = True

    @_holding
    def swap_constant_buffer(self) -> None:
        """Make the inactive buffer active (waits for runs in flight, natively)."""
        self._need("SwapConstantBuffer", "swapping constant buffers")
        if not self._inactive_complete:
            raise InputError(
                "swap refused: the inactive buffer holds no complete weight set "
                "(update it first; it is empty after loading and after free_inactive)"
            )
        self.library.call("SwapConstantBuffer", self._live())
        self._active ^= 1
        self._holds_folded[self._active] = self._folds  # the next run folds it, if not yet

    @_holding
    def free_inactive_constant_buffer(self) -> None:
        """Release the inactive buffer's memory (a later swap needs a complete update first).

        Refused (`UnsupportedOperation`, nothing freed) when the inactive buffer may hold
        runtime-folded constants: torch's container resets their entries to null handles on a
        free, and its next update of that buffer reads one (a segfault, seen with torch 2.13)."""
        self._need("FreeInactiveConstantBuffer", "freeing the inactive buffer")
        if not self._inactive_complete:
            return  # empty already (never filled since loading or the last free); natively,
            # torch 2.11's container crashes freeing an empty buffer of a folding model
        if self._holds_folded[self._active ^ 1]:
            raise UnsupportedOperation(
                "freeing the inactive buffer is refused: it holds runtime-folded constants, and "
                "torch's model container crashes on the next update of such a buffer once freed "
                "(it keeps their entries with null handles); the buffer is kept, and updating "
                "it replaces its weights"
            )
        self.library.call("FreeInactiveConstantBuffer", self._live())
        self._inactive_complete = False

    @property
    @_holding
    def constants_blob_size(self) -> int:
        self._need("GetConstantsBlobSize", "reading the weights blob size")
        n = c_uint64()
        self.library.call("GetConstantsBlobSize", self._live(), byref(n))
        return n.value

    @_holding
    def load_constants_from_blob(self, blob: str | os.PathLike[str] | bytes) -> None:
        """Load the active buffer from a weights blob: the constants' bytes, concatenated in
        constant order (the `*_weights.blob` of packages compiled with
        `package_constants_on_disk_format="binary_blob"`).

        The first load of a blob-built model goes through the native function. Natively, a
        second load would leave the constants pointing at freed memory (torch 2.13 `emplace`s
        into a filled map and frees the old blob), so every later load is a copying
        `update_constants` of the blob's slices instead, which works for any model."""
        self._need("GetConstantsBlobSize", "loading a weights blob")
        data = Path(blob).read_bytes() if not isinstance(blob, bytes) else blob
        want = self.constants_blob_size
        if len(data) < want:
            raise InputError(f"weights blob: expected at least {want} bytes, got {len(data)}")
        if not self._constants_loaded:
            self._need("AOTInductorModelUpdateConstantsFromBlob", "loading a weights blob")
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            self.library.call("AOTInductorModelUpdateConstantsFromBlob", self._live(), buf)
            self._blobs.append(buf)
            self._constants_loaded = True
            return
        shapes: dict[str, tuple[int, ...]] = dict(self.constant_shapes)
        if any(c.name not in shapes for c in self.constants if not c.from_folded):
            shapes.update({k: tuple(t.shape) for k, t in self.extract_constants().items()})
        mapping, offset = {}, 0
        for c in self.constants:
            if c.from_folded:
                continue
            chunk = bytearray(data[offset:offset + c.nbytes])
            offset += c.nbytes
            if c.nbytes and c.dtype is not None and c.name in shapes:
                mapping[c.name] = torch.frombuffer(chunk, dtype=c.dtype).reshape(shapes[c.name])
        self.update_constants(mapping)

    # --- lifetime ----------------------------------------------------------------------------

    def delete(self) -> None:
        """Delete the native container (idempotent), once a constant operation in progress has
        returned. No run may be in flight."""
        with self._ops:
            handle, self._handle = self._handle, None
            if handle is None:
                return
            self.library.call("Delete", handle)
            for kept in self._kept:
                free_handles([h for _, h in kept.values()])
                kept.clear()
            self._blobs.clear()


def open_container(files: object, **kwargs: Any) -> Container:
    """A container over `ModelFiles` (see `package.open_model`), weights blob loaded."""
    from .package import ModelFiles

    if not isinstance(files, ModelFiles):
        raise ModelLoadError(f"expected ModelFiles, got {type(files).__name__}")
    lib = ModelLibrary(files.library, torch_version=files.metadata.get("torch_version"))
    kwargs.setdefault("cubin_dir", files.cubin_dir)
    container = Container(lib, source=files.read_source(), constants_loaded=files.blob is None,
                          **kwargs)
    if files.blob is not None:
        try:
            container.load_constants_from_blob(files.blob)
        except BaseException:
            container.delete()
            raise
    return container
