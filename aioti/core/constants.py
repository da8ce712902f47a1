"""`ConstantBuffers`: a model container's two constant buffers and the state machine around
them, apart from the container's runs and handle conversion.

The native container holds an active and an inactive buffer. It does not say which of them
holds a complete weight set, nor whether a buffer holds runtime-folded constants, and it crashes
when asked for what it does not have (folding an empty buffer, updating a freed buffer of folded
constants). So aioti keeps that state here: which buffer is active, whether the inactive one is
complete, which may hold folded constants, and the tensors of user-managed updates (the buffer
uses their memory, so they are kept alive until replaced or the container goes).

Operations are serialized with each other and with the container's deletion (`lock`): a
deletion waits for the one in progress, and one that comes after it raises `ClosedError`.
Runs are not serialized against them natively: callers hold runs off (the facade's gate) where
the operation changes the active buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Collection, Mapping
from ctypes import byref, c_size_t, c_uint64
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from ..errors import InputError, ModelRunError, UnsupportedOperation
from .library import (
    ConstantEntry,
    free_handles,
    handles_from_tensors,
    new_handle,
    tensors_from_handles,
)

if TYPE_CHECKING:
    from .container import ConstantInfo, Container

__all__ = ["ConstantBuffers"]

F = TypeVar("F", bound=Callable[..., Any])


def _holding(method: F) -> F:
    """An operation, run holding the buffers against the container's deletion."""

    @functools.wraps(method)
    def held(self: ConstantBuffers, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(F, held)


class ConstantBuffers:
    """The constant buffers of `container`."""

    def __init__(self, container: Container, *, constants_loaded: bool = True) -> None:
        self._c = container
        self.lock = threading.RLock()  # held by operations and by the container's deletion
        self._kept: list[dict[str, tuple[torch.Tensor, int]]] = [{}, {}]  # per buffer
        self._active = 0
        self._inactive_complete = False
        self._blobs: list[object] = []
        self._constants_loaded = constants_loaded
        #: counts the operations that may have moved the active constants (a swap, a fold,
        #: an update that is not an in-place copy): what was recorded against their addresses
        #: (CUDA graphs) is stale once it changes
        self.generation = 0
        # Per buffer: may it hold runtime-folded constants? The active one does once a run has
        # folded it (the first run does). See `free_inactive_constants`.
        # (A library that cannot say which constants are folded is taken to fold.)
        self._folds = any(c.from_folded for c in container.constants) or not container.library.has(
            "GetConstantFromFolded")
        self._holds_folded = [self._folds, False]

    @property
    def loaded(self) -> bool:
        """Whether the active buffer holds a complete weight set. Not so for a package that
        holds no weights (compiled with `package_constants_in_so=False` and none stored on
        disk) until one arrives: the model's runs would read constants that do not exist."""
        return self._constants_loaded

    def unloaded_error(self) -> ModelRunError:
        """What a run, a probe or a fold of a model without weights raises."""
        return ModelRunError(
            "this model has no weights yet: its package holds none (compiled with "
            "aot_inductor.package_constants_in_so=False, and no weights stored on disk); pass "
            "weights= to aioti.load, or give every constant to update_constants (it needs: "
            f"{', '.join(self.missing_constants(set()))})")

    @property
    def folds(self) -> bool:
        """Whether the model folds constants at run time (a hot swap then folds the new ones)."""
        return self._folds

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
            info = self._c._by_name.get(key) or self._c._by_fqn.get(key)
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
            shape = self._c.constant_shapes.get(info.name)
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
            t = value.detach().to(self._c.device)
            if private and t.data_ptr() == value.data_ptr() or not (
                t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == nbytes
            ):
                t = t.contiguous().clone()
            out[info.name] = t
        if unknown:
            known = ", ".join(sorted(self._c.constant_fqns.values()))
            raise InputError(
                f"unknown constant(s) {', '.join(map(repr, unknown))}: not runtime constants of "
                f"this model (folded or inlined at compile time, or misspelt); it has: {known}"
            )
        return out

    def missing_constants(self, names: set[str]) -> list[str]:
        return [c.fqn or c.name for c in self._c.constants
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
        copying = not user_managed and self._c.library.has("UpdateConstantBufferPairs")
        resolved = self.resolve_constants(mapping, private=not copying and not user_managed)
        missing = self.missing_constants(set(resolved))
        if validate_full and missing:
            raise InputError(f"validate_full: constants missing from the mapping: {missing}")
        if missing and not self._constants_loaded and (not inactive or not self._inactive_complete):
            raise InputError(
                "this model has no weights yet (its package holds none), so the first update "
                f"must give every constant; missing: {missing}")
        if inactive and not self._inactive_complete and missing:
            # The inactive buffer holds no complete weight set yet: complete it from the active
            # one, so that a later swap never activates missing constants.
            if not self._c.library.has("ExtractConstantsMapEntries"):
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
            self._c._need("UpdateUserManagedConstantBufferPairs", "updating constants")
        fn = "UpdateConstantBufferPairs" if copying else "UpdateUserManagedConstantBufferPairs"
        names = list(resolved)
        tensors = [resolved[n] for n in names]
        handles = handles_from_tensors(tensors)
        pairs = (ConstantEntry * len(names))(
            *(ConstantEntry(n.encode(), h) for n, h in zip(names, handles))
        )
        try:
            self._c.library.call(fn, self._c._live(), pairs, len(names), inactive, validate_full)
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
        else:
            if not copying or not self._constants_loaded:
                self.generation += 1  # new tensors (or a first fill), not a copy in place
            self._constants_loaded = True  # complete: a partial update needs it loaded

    def update_inactive_constants(self, mapping: Mapping[str, object]) -> None:
        """Update the inactive buffer (a shorthand for `update_constants(..., inactive=True)`).

        While the inactive buffer holds no complete weight set (after loading, and after
        `free_inactive_constants`), constants missing from `mapping` are taken from the
        active buffer, so the buffer a later swap activates is always complete."""
        self.update_constants(mapping, inactive=True)

    @_holding
    def stage_constants(self, mapping: Mapping[str, object]) -> None:
        """Fill the inactive buffer with the *active* buffer's constants updated by `mapping`,
        so that a swap activates the current weights with `mapping` applied (a partial hot
        swap). Constants missing from `mapping` are read from the active buffer: copies kept
        from earlier updates, else extracted; `InputError` if the library cannot do either."""
        named = {info.name for key in mapping
                 if (info := self._c._by_name.get(key) or self._c._by_fqn.get(key)) is not None}
        missing = {c.name for c in self._c.constants if not c.from_folded and c.name not in named}
        current = self._held_values(False, missing, "a partial hot swap must give {} too: this "
                                    "library cannot read the active buffer's constants")
        self.update_constants({**current, **mapping}, inactive=True)

    @_holding
    def extract_constants(self, *, inactive: bool = False, by_fqn: bool = False
                          ) -> dict[str, torch.Tensor]:
        """Copies of the constants of the active (or inactive) buffer, keyed by internal name
        (or by FQN). Folded constants are not included. An empty inactive buffer (after loading
        and after a free) gives {}."""
        self._c._need("ExtractConstantsMapEntries", "extracting constants")
        if inactive and not self._inactive_complete:
            return {}  # empty: natively, after a free, its entries point into the freed blob
        return {fqn if by_fqn or info is None else info.name: t
                for fqn, info, t in self._extract(inactive)}

    def _extract(self, inactive: bool, only: Collection[str] | None = None
                 ) -> list[tuple[str, ConstantInfo | None, torch.Tensor]]:
        """(FQN, info, copy) of a buffer's constants; with `only`, of those internal names."""
        entries = ctypes.POINTER(ConstantEntry)()
        n = c_size_t()
        self._c.library.call("ExtractConstantsMapEntries", self._c._live(), byref(entries), byref(n), inactive)
        picked = []
        for i in range(n.value):
            fqn = (entries[i].name or b"").decode()
            info = self._c._by_fqn.get(fqn)
            if only is None or info is not None and info.name in only:
                picked.append((fqn, info, new_handle(entries[i].handle)))
        tensors = tensors_from_handles([h for _, _, h in picked])
        return [(fqn, info, t.clone()) for (fqn, info, _), t in zip(picked, tensors)]

    def _carried_over(self, resolved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For a partial update of the complete inactive buffer: its own current values of the
        constants missing from it that torch's container would otherwise replace with the
        active buffer's (module buffers, tensor constants, empty parameters; any of unknown
        kind), so that the update changes only what it names."""
        names = {c.name for c in self._c.constants if not c.from_folded and c.name not in resolved
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
            if not self._c.library.has("ExtractConstantsMapEntries"):
                raise InputError(unreadable.format(sorted(rest)))
            out.update({info.name: t for _, info, t in self._extract(inactive, rest) if info})
        return out

    @_holding
    def fold_constants(self, *, inactive: bool = False, stream: int | None = None) -> None:
        """Fold constants of the active (or inactive) buffer; folding the active one waits for
        runs in flight (the native container takes its exclusive lock). A model without runtime
        constant folding has nothing to fold: a no-op. Folding an inactive buffer that holds no
        complete weight set is refused: natively it reads constants that are missing (a
        segfault) or freed."""
        self._c._need("RunConstantFolding", "constant folding")
        if not self._folds:
            return  # nothing to fold (natively: a warning printed to stderr, nothing else)
        if not inactive and not self._constants_loaded:
            raise self.unloaded_error()
        if inactive and not self._inactive_complete:
            raise InputError(
                "fold refused: the inactive buffer holds no complete weight set "
                "(update it first; it is empty after loading and after free_inactive)"
            )
        self._c.library.call("RunConstantFolding", self._c._live(), inactive, stream,
                             self._c._proxy_address)
        self._holds_folded[self._active ^ int(inactive)] = True
        if not inactive:
            self.generation += 1

    @_holding
    def swap_constants(self) -> None:
        """Make the inactive buffer active (waits for runs in flight, natively)."""
        self._c._need("SwapConstantBuffer", "swapping constant buffers")
        handle = self._c._live()  # a deleted container says so, not that its buffer is empty
        if not self._inactive_complete:
            raise InputError(
                "swap refused: the inactive buffer holds no complete weight set "
                "(update it first; it is empty after loading and after free_inactive)"
            )
        self._c.library.call("SwapConstantBuffer", handle)
        self._active ^= 1
        self._inactive_complete, self._constants_loaded = self._constants_loaded, True
        self.generation += 1
        self._holds_folded[self._active] = self._folds  # the next run folds it, if not yet

    @_holding
    def free_inactive_constants(self) -> None:
        """Release the inactive buffer's memory (a later swap needs a complete update first).

        Refused (`UnsupportedOperation`, nothing freed) when the inactive buffer may hold
        runtime-folded constants: torch's container resets their entries to null handles on a
        free, and its next update of that buffer reads one (a segfault, seen with torch 2.13)."""
        self._c._need("FreeInactiveConstantBuffer", "freeing the inactive buffer")
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
        self._c.library.call("FreeInactiveConstantBuffer", self._c._live())
        self._inactive_complete = False

    @property
    @_holding
    def constants_blob_size(self) -> int:
        self._c._need("GetConstantsBlobSize", "reading the weights blob size")
        n = c_uint64()
        self._c.library.call("GetConstantsBlobSize", self._c._live(), byref(n))
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
        self._c._need("GetConstantsBlobSize", "loading a weights blob")
        data = Path(blob).read_bytes() if not isinstance(blob, bytes) else blob
        want = self.constants_blob_size
        if len(data) < want:
            raise InputError(f"weights blob: expected at least {want} bytes, got {len(data)}")
        if not self._constants_loaded:
            self._c._need("AOTInductorModelUpdateConstantsFromBlob", "loading a weights blob")
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            self._c.library.call("AOTInductorModelUpdateConstantsFromBlob", self._c._live(), buf)
            self._blobs.append(buf)
            self._constants_loaded = True
            self.generation += 1
            return
        shapes: dict[str, tuple[int, ...]] = dict(self._c.constant_shapes)
        if any(c.name not in shapes for c in self._c.constants if not c.from_folded):
            shapes.update({k: tuple(t.shape) for k, t in self.extract_constants().items()})
        mapping, offset = {}, 0
        for c in self._c.constants:
            if c.from_folded:
                continue
            chunk = bytearray(data[offset:offset + c.nbytes])
            offset += c.nbytes
            if c.nbytes and c.dtype is not None and c.name in shapes:
                mapping[c.name] = torch.frombuffer(chunk, dtype=c.dtype).reshape(shapes[c.name])
        self.update_constants(mapping)

    def release(self) -> None:
        """Once the native container is deleted (holding `lock`): drop what the buffers kept."""
        for kept in self._kept:
            free_handles([h for _, h in kept.values()])
            kept.clear()
        self._blobs.clear()
