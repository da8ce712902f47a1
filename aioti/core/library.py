"""ctypes binding of a model library's C ABI (`torch/csrc/inductor/aoti_runtime/interface.h`).

`ModelLibrary` opens one compiled model (`*.wrapper.so`), declares the prototype of every
container function it exports, records which optional ones are present (the set differs by torch
version) and turns non-zero return codes into `ModelRunError`. The tensor helpers below move
`torch.Tensor`s across the boundary as `AtenTensorHandle`s (heap `at::Tensor*`).

ctypes releases the GIL for the duration of every call into the library, which is what lets
worker threads run models while the event loop keeps going.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Sequence
from ctypes import POINTER, byref, c_bool, c_char_p, c_int32, c_size_t, c_uint64, c_void_p
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, ModelRunError

__all__ = ["ConstantEntry", "ModelLibrary", "free_handles", "handles_from_tensors",
           "new_handle", "tensors_from_handles"]


class ConstantEntry(ctypes.Structure):
    """`AOTInductorConstantMapEntry`: a constant's name and a borrowed tensor handle."""

    _fields_ = [("name", c_char_p), ("handle", c_void_p)]


_H = c_void_p  # every opaque handle (container, tensor, stream, proxy executor)
_PH = POINTER(c_void_p)
_PSTR = POINTER(c_char_p)
_PAIRS = (_H, POINTER(ConstantEntry), c_size_t)

# name (without the "AOTInductorModelContainer" prefix where it has one) -> argtypes.
# Required functions are the ones every supported torch version exports.
_REQUIRED: dict[str, tuple[object, ...]] = {
    "CreateWithDevice": (_PH, c_size_t, c_char_p, c_char_p),
    "Delete": (_H,),
    "Run": (_H, _PH, c_size_t, _PH, c_size_t, _H, _H),
    "GetNumInputs": (_H, POINTER(c_size_t)),
    "GetNumOutputs": (_H, POINTER(c_size_t)),
}
_OPTIONAL: dict[str, tuple[object, ...]] = {
    "RunSingleThreaded": (_H, _PH, c_size_t, _PH, c_size_t, _H, _H),
    "GetInputName": (_H, c_size_t, _PSTR),
    "GetOutputName": (_H, c_size_t, _PSTR),
    "GetCallSpec": (_H, _PSTR, _PSTR),
    "GetNumConstants": (_H, POINTER(c_size_t)),
    "GetConstantName": (_H, c_size_t, _PSTR),
    "GetConstantOriginalFQN": (_H, c_size_t, _PSTR),
    "GetConstantFromFolded": (_H, c_size_t, POINTER(c_bool)),
    "GetConstantType": (_H, c_size_t, POINTER(c_int32)),
    "GetConstantDtype": (_H, c_size_t, POINTER(c_int32)),
    "GetConstantDataSize": (_H, c_size_t, POINTER(c_size_t)),
    "ExtractConstantsMapEntries": (_H, POINTER(POINTER(ConstantEntry)), POINTER(c_size_t), c_bool),
    "UpdateConstantBufferPairs": (*_PAIRS, c_bool, c_bool),
    "UpdateConstantBufferFromCpuPairs": (*_PAIRS, c_bool, c_bool),
    "UpdateUserManagedConstantBufferPairs": (*_PAIRS, c_bool, c_bool),
    "UpdateInactiveConstantBufferPairs": _PAIRS,
    "RunConstantFolding": (_H, c_bool, _H, _H),
    "SwapConstantBuffer": (_H,),
    "FreeInactiveConstantBuffer": (_H,),
    "GetConstantsBlobSize": (_H, POINTER(c_uint64)),
    # These two have no "Container" in their exported names.
    "AOTInductorModelUpdateConstantsFromBlob": (_H, c_void_p),
    "AOTInductorGetLastError": (_PSTR,),
}
_PREFIX = "AOTInductorModelContainer"

_libstdcxx_lock = threading.Lock()
_libstdcxx_loaded = False


def _load_libstdcxx_globally() -> None:
    """Put libstdc++ in the global symbol scope before any model library is opened.

    Without it, creating a CUDA container segfaults inside `std::regex` on some torch builds
    (FACTS: torch 2.11+cu130 with g++ 13): the model library would bind a second copy of the
    locale machinery. Loading it once, globally, makes every later library share one copy.
    """
    global _libstdcxx_loaded
    with _libstdcxx_lock:
        if not _libstdcxx_loaded:
            try:
                ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
            except OSError:  # not a glibc/libstdc++ system: nothing to share
                pass
            _libstdcxx_loaded = True


def _symbol(name: str) -> str:
    return name if name.startswith("AOTInductor") else _PREFIX + name


def check_elf(path: Path) -> None:
    """Refuse a damaged shared library before `dlopen` maps it: every loadable segment and the
    section header table must lie within the file. A library cut short (a partial copy, a
    truncated member re-packed in a valid zip) maps pages past the file's end, and touching
    them (the constants, when the container is created) kills the process with SIGBUS."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            raise ModelLoadError(f"cannot open model library {str(path)!r}: not a shared "
                                 f"library (no ELF header in its {size} bytes)")
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 54)
        else:
            phoff, shoff = struct.unpack_from(order + "II", head, 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 42)
        need = [("the program headers", phoff + phentsize * phnum),
                ("the section headers", shoff + shentsize * shnum)]
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        if len(table) == phentsize * phnum:
            for i in range(phnum):
                entry = table[i * phentsize:(i + 1) * phentsize]
                if wide:
                    kind, _, offset, _, _, filesz = struct.unpack_from(order + "IIQQQQ", entry)
                else:
                    kind, offset, _, _, filesz = struct.unpack_from(order + "IIIII", entry)
                if kind == 1:  # PT_LOAD
                    need.append((f"loadable segment {i}", offset + filesz))
    for what, end in need:
        if end > size:
            raise ModelLoadError(
                f"cannot open model library {str(path)!r}: it is truncated or damaged: {what} "
                f"end at byte "
                f"{end}, but the file has {size} bytes (a partial copy? extract or copy it "
                "again)")


class ModelLibrary:
    """One opened model library: its functions, which optional ones exist, and error checking."""

    def __init__(self, path: str | os.PathLike[str], *, torch_version: str | None = None) -> None:
        self.path = Path(path)
        #: torch version that built the library, where the package says (for error messages).
        self.torch_version = torch_version
        if not self.path.is_file():
            raise ModelLoadError(f"model library {str(self.path)!r} does not exist")
        check_elf(self.path)
        _load_libstdcxx_globally()
        try:
            self._dll = ctypes.CDLL(str(self.path), mode=ctypes.RTLD_LOCAL)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot open model library {str(self.path)!r}: {exc} "
                "(built for another platform or torch, or not a model library?)"
            ) from exc
        self.functions: dict[str, Any] = {}
        for table, required in ((_REQUIRED, True), (_OPTIONAL, False)):
            for name, argtypes in table.items():
                try:
                    fn = getattr(self._dll, _symbol(name))
                except AttributeError:
                    if required:
                        raise ModelLoadError(
                            f"{str(self.path)!r} is not an AOTInductor model library: "
                            f"it lacks {_symbol(name)}"
                        ) from None
                    continue
                fn.argtypes = list(argtypes)
                fn.restype = c_int32
                self.functions[name] = fn
        self._get_last_error = self.functions.get("AOTInductorGetLastError")

    @property
    def available(self) -> frozenset[str]:
        """Full names of the ABI functions this library exports (of those aioti knows)."""
        return frozenset(_symbol(n) for n in self.functions)

    @property
    def missing(self) -> frozenset[str]:
        """Full names of the optional ABI functions this library does not export."""
        return frozenset(_symbol(n) for n in _OPTIONAL if n not in self.functions)

    def has(self, name: str) -> bool:
        return name in self.functions

    def call(self, name: str, *args: object) -> None:
        """Call function `name`; a non-zero code becomes `ModelRunError` with the runtime's reason."""
        code = self.functions[name](*args)
        if code:
            raise ModelRunError(self.describe_failure(name, code))

    def describe_failure(self, name: str, code: int) -> str:
        """The message for a failed call, read on the thread that made it."""
        reason = ""
        if self._get_last_error is not None:
            msg = c_char_p()
            if self._get_last_error(byref(msg)) == 0 and msg.value:
                reason = msg.value.decode(errors="replace").strip()
        if not reason:
            reason = "the library gives no reason (it printed any to stderr)"
        return f"{_symbol(name)} failed with code {code} for model {self.path.name}: {reason}"


# --- tensors across the boundary -------------------------------------------------------------

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [c_void_p, c_char_p, c_void_p]

_to_capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors
_steal_capsules = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs


def handles_from_tensors(tensors: Sequence[torch.Tensor]) -> list[int]:
    """New owning handles (heap `at::Tensor*`) sharing each tensor's storage."""
    return [_capsule_pointer(c, None) for c in _to_capsules(list(tensors))]


def tensors_from_handles(handles: Sequence[int]) -> list[torch.Tensor]:
    """Tensors that take over (steal) owning handles; the handles must not be used afterwards."""
    return _steal_capsules([_capsule_new(h, None, None) for h in handles])


def free_handles(handles: Sequence[int | None]) -> None:
    """Release owning handles (null entries are skipped)."""
    live = [h for h in handles if h]
    if live:
        tensors_from_handles(live)


_libtorch: ctypes.CDLL | None = None


def new_handle(borrowed: int) -> int:
    """A new owning handle to the tensor behind a borrowed one (`aoti_torch_new_tensor_handle`)."""
    global _libtorch
    if _libtorch is None:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        lib.aoti_torch_new_tensor_handle.argtypes = [c_void_p, POINTER(c_void_p)]
        lib.aoti_torch_new_tensor_handle.restype = c_int32
        _libtorch = lib
    out = c_void_p()
    if _libtorch.aoti_torch_new_tensor_handle(borrowed, byref(out)):
        raise ModelRunError("aoti_torch_new_tensor_handle failed")
    return out.value  # type: ignore[return-value]
