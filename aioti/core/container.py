"""The synchronous model container: runs, metadata and constants over one `ModelLibrary`.

A `Container` may be used from many threads at once, as the native container is: runs on up to
`num_models` threads proceed in parallel. Every run goes through `run_many` (`run`, `boxed_run`
and `run_tensors` are its one-run forms). The constant buffers and their operations are
`container.buffers` (`constants.ConstantBuffers`).

Ownership across the boundary:
- `run` makes a new owning handle per input; the native `Run` steals (frees) them.
- the output handles `Run` writes are owned by the caller and become tensors at once; if a run
  fails after writing some of them, those are freed.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from ctypes import byref, c_bool, c_char_p, c_int32, c_size_t, c_void_p
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, ModelLoadError, ModelRunError, UnsupportedOperation
from . import runmany
from .constants import ConstantBuffers
from .library import (
    ModelLibrary,
    free_handles,
    handles_from_tensors,
    tensors_from_handles,
)
from .proxy import ProxyExecutor, extern_nodes
from .signature import Signature, constant_shapes, embeds_weights, input_labels, parse_signature
from .weights import read_package_weights

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


class Container:
    """A native model container. Create it, `run` it, and `delete` it when done.

    `device` is a device string ("cpu", "cuda:1"); `num_models` the number of model instances
    that may run at once; `single_threaded` uses `RunSingleThreaded`, for callers that never
    run concurrently; `check_inputs` makes `run` validate inputs against the model's signature;
    `proxy` runs the operators the model calls without a C shim (`proxy.ProxyExecutor`; the
    container owns it); `constants_loaded=False` says that the model's constants are not in
    its library: runs are refused until a complete weight set arrives (`ConstantBuffers`).
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
        proxy: ProxyExecutor | None = None,
    ) -> None:
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        self.library = library
        self.device = torch.device(device)
        self.num_models = num_models
        self.check_inputs = check_inputs
        self.proxy = proxy
        self._proxy_address = proxy.address if proxy is not None else None
        handle = c_void_p()
        cubin = str(cubin_dir).encode() if cubin_dir is not None else None
        library.call("CreateWithDevice", byref(handle), num_models, str(self.device).encode(), cubin)
        self._handle: int | None = handle.value
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
        #: the constant buffers and their operations
        self.buffers = ConstantBuffers(self, constants_loaded=constants_loaded)

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
        """Run once on already checked tensors; raises the run's error."""
        (out,) = self.run_many([tensors], stream)
        if isinstance(out, Exception):
            raise out
        return out

    def capture_run(self, tensors: Sequence[torch.Tensor], stream: int | None
                    ) -> list[torch.Tensor]:
        """One run through `RunSingleThreaded`, the only run a CUDA graph can capture (`Run`
        queries events to pick a model instance). No other run may be in flight."""
        self._need("RunSingleThreaded", "capturing a CUDA graph")
        handle = self._live()
        if not self.buffers.loaded:
            raise self.buffers.unloaded_error()
        out = self._run_one(self.library.functions["RunSingleThreaded"], handle, tensors, stream)
        if isinstance(out, Exception):
            raise out
        return out

    def _run_one(self, fn: Any, handle: int, tensors: Sequence[torch.Tensor],
                 stream: int | None) -> list[torch.Tensor] | ModelRunError:
        """One run through `fn` (`Run` or `RunSingleThreaded`): one ctypes call, no helper
        arrays. Its outputs, or its error."""
        outs = self._out_array()
        code = fn(handle, self._in_array(*handles_from_tensors(tensors)), self.num_inputs, outs,
                  self.num_outputs, stream, self._proxy_address)
        if code:
            free_handles(list(outs))  # its outputs may be partly written
            return self._failure(code)
        return tensors_from_handles(list(outs))

    def run_many(self, batch: Sequence[Sequence[torch.Tensor]], stream: int | None = None
                 ) -> list[list[torch.Tensor] | Exception]:
        """Run once per entry of `batch` (already checked inputs), in order, on one stream: each
        run's outputs, or the exception it raised (a failed run does not stop the others).

        Handles are made and taken back for the whole batch at once, and with the native helper
        (`runmany`) every run goes in one GIL-free call."""
        handle = self._live()  # a closed container raises before any handle is made
        if not self.buffers.loaded:
            raise self.buffers.unloaded_error()
        n_in, n_out = self.num_inputs, self.num_outputs
        if len(batch) == 1 and len(batch[0]) == n_in and not self._native_checks:
            # One run (a merged batch, a lone request).
            return [self._run_one(self._run_fn, handle, batch[0], stream)]
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
            failed[bad] = self._failure(code)
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
                          count - start, stream, self._proxy_address, byref(done))
            return code, done.value
        for k in range(start, count):
            code = self._run_fn(
                self._live(), self._in_array.from_buffer(ins, k * n_in * width), n_in,
                self._out_array.from_buffer(outs, k * n_out * width), n_out, stream,
                self._proxy_address)
            if code:
                return code, k - start
        return 0, count - start

    def _failure(self, code: int) -> ModelRunError:
        """The error of a run that returned `code`, read on the thread that ran it: the
        library's message, or the exception of an operator the proxy executor ran."""
        failed = self.proxy.take_error() if self.proxy is not None else None
        if failed is None:
            return ModelRunError(self.library.describe_failure("Run", code))
        error = ModelRunError(f"the run failed: {failed[0]}")
        error.__cause__ = failed[1]
        return error

    # --- lifetime ----------------------------------------------------------------------------

    def delete(self) -> None:
        """Delete the native container (idempotent), once a constant operation in progress has
        returned. No run may be in flight."""
        with self.buffers.lock:
            handle, self._handle = self._handle, None
            if handle is None:
                return
            self.library.call("Delete", handle)
            self.buffers.release()
            if self.proxy is not None:
                self.proxy.close()


def open_container(files: object, **kwargs: Any) -> Container:
    """A container over `ModelFiles` (see `package.open_model`): with a proxy executor when the
    model calls operators through one, and the package's weights loaded when it stores them
    outside the library (a blob, or `torch.save`d tensors). A package that holds no weights
    gives a container that refuses to run until a complete weight set arrives."""
    from .package import ModelFiles

    if not isinstance(files, ModelFiles):
        raise ModelLoadError(f"expected ModelFiles, got {type(files).__name__}")
    lib = ModelLibrary(files.library, torch_version=files.metadata.get("torch_version"))
    kwargs.setdefault("cubin_dir", files.cubin_dir)
    source = files.read_source()
    nodes = extern_nodes(files.extern_json)
    proxy = ProxyExecutor(nodes, torch.device(kwargs.get("device", "cpu"))) if nodes else None
    try:
        container = Container(lib, source=source, proxy=proxy, constants_loaded=(
            files.blob is None and embeds_weights(source)), **kwargs)
    except BaseException:
        if proxy is not None:
            proxy.close()
        raise
    try:
        if files.blob is not None:
            container.buffers.load_constants_from_blob(files.blob)
        elif files.weights_config is not None:
            container.buffers.update_constants(read_package_weights(files.weights_config),
                                               validate_full=True)
    except BaseException:
        container.delete()
        raise
    return container
