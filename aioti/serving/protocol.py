"""The Open Inference Protocol (KServe v2) on the wire: datatypes, tensor names, and the JSON
and binary (Triton's binary tensor data extension) forms of tensors in requests and responses.

JSON goes through `orjson` where it is installed (the `serve` extra has it; a mid-size tensor's
JSON is then about ten times cheaper to read and write, which is the server loop's time), else
through the standard library's `json`; a request that orjson refuses (the NaN and Infinity
tokens the standard library takes) is read by the standard library. Written by orjson, a
non-finite float is `null` (the standard library writes `NaN`, which is not JSON).

Names: a model's flat inputs and outputs are named by their place in its pytree - a keyword
argument by its key (`scale`), a positional one as `input<i>`, an output as `output<i>` (or its
dict key); nested places join with dots (`pair.0`). A tensor's dynamic dims are -1 in
metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import InputError

orjson: Any
try:
    import orjson
except ImportError:  # the serve extra installs it
    orjson = None

__all__ = ["DATATYPES", "BadRequest", "Decoded", "datatype", "decode_request", "encode_response",
           "input_names", "output_names"]

#: OIP datatype -> torch dtype (BYTES has no tensor form here)
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_NAMES = {v: k for k, v in DATATYPES.items()}

#: the request header that says how many bytes of the body are JSON (the rest is binary data)
HEADER_LENGTH = "inference-header-content-length"


class BadRequest(InputError):
    """A request that does not follow the protocol or does not fit the model (HTTP 400)."""


def datatype(dtype: torch.dtype | None) -> str:
    """The OIP datatype of a torch dtype ("FP32", ...)."""
    if dtype is None:
        return "UNKNOWN"
    return _NAMES.get(dtype, str(dtype).removeprefix("torch.").upper())


def _place_names(spec: Any, positional: str) -> list[str]:
    """A name per leaf of a pytree spec: dict keys and indices, joined with dots; a top-level
    sequence's items are `<positional><i>`."""
    n = spec.num_leaves
    tree = pytree.tree_unflatten(list(range(n)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = []
        for k, key in enumerate(path):
            if hasattr(key, "key"):
                parts.append(str(key.key))
            elif hasattr(key, "idx"):
                parts.append(f"{positional}{key.idx}" if k == 0 else str(key.idx))
            else:
                parts.append(str(key))
        names.append(".".join(parts) or f"{positional}0")
    return names


def input_names(in_spec: Any, count: int) -> list[str]:
    """The OIP names of a model's flat inputs (from its input spec: `((args...), {kwargs})`)."""
    if in_spec is None or in_spec.num_leaves != count:
        return [f"input{i}" for i in range(count)]
    names = _place_names(in_spec, "")
    # ((args), {kwargs}): drop the leading "0."/"1." of the (args, kwargs) pair
    out = []
    for name in names:
        head, _, rest = name.partition(".")
        if head == "0":  # positional: input<i>[.rest]
            idx, _, more = rest.partition(".")
            out.append(f"input{idx}" + (f".{more}" if more else ""))
        else:
            out.append(rest)
    return out


def output_names(out_spec: Any, count: int) -> list[str]:
    """The OIP names of a model's flat outputs (from its output spec)."""
    if out_spec is None or out_spec.num_leaves != count or out_spec.num_leaves == 1 and \
            out_spec == pytree.tree_structure(0):
        return [f"output{i}" for i in range(count)]
    return _place_names(out_spec, "output")


@dataclass
class Decoded:
    """An inference request, decoded: the flat inputs in the model's order, the request id,
    which outputs to return (None: all) and which of them as binary data."""

    inputs: list[torch.Tensor]
    id: str | None
    outputs: list[str] | None
    #: outputs whose `binary_data` parameter was given, and its value
    binary: dict[str, bool]
    #: the request's `binary_data_output` parameter: binary unless an output says otherwise
    binary_default: bool


def _tensor_from_json(entry: dict[str, Any], dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    data = entry.get("data")
    if data is None:
        raise BadRequest(f"input {entry['name']!r}: no 'data' (and no binary_data_size)")
    try:
        t = torch.tensor(data, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BadRequest(f"input {entry['name']!r}: data is not {datatype(dtype)}: {exc}") from exc
    if t.numel() != _numel(shape):
        raise BadRequest(f"input {entry['name']!r}: shape {shape} holds {_numel(shape)} "
                         f"elements, data has {t.numel()}")
    return t.reshape(shape)


def _params(holder: dict[str, Any], what: str) -> dict[str, Any]:
    """The `parameters` object of a request, an input or an output ({} when absent)."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what}: 'parameters' must be an object, got {params!r}")
    return params


def _is_int(value: Any) -> bool:
    """A JSON integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_request(body: bytes, header_length: int | None, names: list[str]) -> Decoded:
    """Parse an infer request body (JSON, or JSON then binary tensor data) into the model's flat
    inputs; `BadRequest` naming what is wrong."""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {header_length}, but the body has "
                             f"{len(body)} bytes")
        head, rest = body[:header_length], memoryview(body)[header_length:]
    else:
        head, rest = body, memoryview(b"")
    try:
        req = _loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request is not JSON: {exc}") from exc
    except RecursionError as exc:  # the standard library's parser recurses per nesting level
        raise BadRequest(f"the request's JSON is nested too deeply: {exc}") from exc
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise BadRequest("the request needs an 'inputs' list")
    by_name: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in req["inputs"]:
        if not isinstance(entry, dict) or not {"name", "shape", "datatype"} <= set(entry):
            raise BadRequest("each input needs 'name', 'shape' and 'datatype'")
        name = entry["name"]
        if not isinstance(name, str) or name not in names:
            raise BadRequest(f"unknown input {name!r}; the model takes {names}")
        if name in by_name:
            raise BadRequest(f"input {name!r} is given twice")
        dtype = DATATYPES.get(entry["datatype"]) if isinstance(entry["datatype"], str) else None
        if dtype is None:
            raise BadRequest(f"input {name!r}: datatype {entry['datatype']!r} is not supported "
                             f"(supported: {', '.join(DATATYPES)})")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
        size = _params(entry, f"input {name!r}").get("binary_data_size")
        if size is not None:
            want = _numel(shape) * dtype.itemsize
            if not _is_int(size) or size != want or offset + size > len(rest):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size}, but shape {shape} of "
                    f"{entry['datatype']} needs {want} bytes and {len(rest) - offset} are left")
            raw = bytearray(rest[offset:offset + size])
            offset += size
            t = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
            by_name[name] = t.reshape(shape)
        else:
            by_name[name] = _tensor_from_json(entry, dtype, shape)
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes of binary data follow no input")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise BadRequest(f"missing inputs {missing}; the model takes {names}")
    params = _params(req, "the request")
    wanted = req.get("outputs")
    outputs = None
    binary: dict[str, bool] = {}
    if wanted is not None:
        if not isinstance(wanted, list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for o in wanted:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest(f"each requested output needs a 'name' string, got {o!r}")
            outputs.append(o["name"])
            flag = _params(o, f"output {o['name']!r}").get("binary_data")
            if flag is not None:
                binary[o["name"]] = bool(flag)
    rid = req.get("id")
    return Decoded([by_name[n] for n in names], None if rid is None else str(rid), outputs,
                   binary, bool(params.get("binary_data_output")))


def encode_response(model_name: str, version: str | None, decoded: Decoded,
                    names: list[str], outputs: list[torch.Tensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows (None: all
    JSON). Outputs not requested are left out; `BadRequest` for an unknown output name."""
    by_name = dict(zip(names, outputs))
    chosen = names if decoded.outputs is None else decoded.outputs
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; the model gives {names}")
    entries, blobs = [], []
    for name in chosen:
        t = by_name[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "datatype": datatype(t.dtype)}
        if decoded.binary.get(name, decoded.binary_default):
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(t)
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if version is not None:
        body["model_version"] = version
    if decoded.id is not None:
        body["id"] = decoded.id
    head = _dumps(body)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _loads(data: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library takes NaN and Infinity, or says what is wrong
    return json.loads(data)


def _dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_data(t: torch.Tensor) -> Any:
    """A contiguous CPU tensor's elements for a JSON `data` list: as a numpy array where orjson
    writes it (numbers in their own precision: a float32 as the shortest text that reads back
    to it), else as Python numbers. Half floats go as float32."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    if orjson is not None:
        try:
            return t.reshape(-1).numpy()
        except TypeError:  # a dtype numpy lacks
            pass
    return t.reshape(-1).tolist()
