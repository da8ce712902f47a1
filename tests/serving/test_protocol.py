"""The protocol's JSON forms of tensors, read and written through orjson and through the
standard library (as where orjson is not installed): the same tensors come back; and requests
of any form, decoded as declared or refused as bad requests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("orjson")

from aioti.serving import protocol  # noqa: E402
from aioti.serving.protocol import BadRequest, decode_request, encode_response  # noqa: E402


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "json":
        monkeypatch.setattr(protocol, "orjson", None)
    return request.param


def request_body(t: torch.Tensor, datatype: str) -> bytes:
    return json.dumps({"id": "r1", "inputs": [{"name": "input0", "shape": list(t.shape),
                                               "datatype": datatype,
                                               "data": t.flatten().tolist()}]}).encode()


@pytest.mark.parametrize(("dtype", "datatype"), [
    (torch.float32, "FP32"), (torch.float64, "FP64"), (torch.float16, "FP16"),
    (torch.bfloat16, "BF16"), (torch.int64, "INT64"), (torch.int32, "INT32"),
    (torch.uint8, "UINT8"), (torch.bool, "BOOL"),
])
def test_json_tensors_come_back_equal(codec: str, dtype: torch.dtype, datatype: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    decoded = decode_request(request_body(t, datatype), None, ["input0"])
    assert decoded.inputs[0].dtype == dtype and torch.equal(decoded.inputs[0], t)
    assert decoded.id == "r1"
    body, head = encode_response("m", "1", decoded, ["output0"], [t])
    assert head is None
    out = json.loads(body)["outputs"][0]
    assert out["shape"] == [3, 5] and out["datatype"] == datatype
    # half floats are written as float32, which holds them exactly
    back = torch.tensor(out["data"], dtype=torch.float32 if dtype.is_floating_point else dtype)
    assert torch.equal(back.to(dtype).reshape(3, 5), t)
    assert json.loads(body)["id"] == "r1"


def test_non_finite_floats(codec: str) -> None:
    """NaN and Infinity tokens (not JSON, but sent by Python clients) are read on both paths;
    written, non-finite floats stay readable JSON-ish: `null` by orjson, `NaN` by the
    standard library."""
    body = b'{"inputs": [{"name": "input0", "shape": [3], "datatype": "FP32", ' \
           b'"data": [1.5, NaN, -Infinity]}]}'
    x = decode_request(body, None, ["input0"]).inputs[0]
    assert x[0] == 1.5 and math.isnan(x[1]) and x[2] == -math.inf
    decoded = decode_request(request_body(torch.zeros(3), "FP32"), None, ["input0"])
    out, _ = encode_response("m", "1", decoded, ["output0"], [x])
    data = json.loads(out)["outputs"][0]["data"]
    assert data[0] == 1.5
    if codec == "orjson":
        assert data[1:] == [None, None]
    else:
        assert math.isnan(data[1]) and data[2] == -math.inf


@pytest.mark.parametrize("body", [b"{not json", b'{"inputs": [{"name": "input0", "shape": [2], '
                                  b'"datatype": "FP32", "data": ["a", "b"]}]}'])
def test_bad_json_is_a_bad_request(codec: str, body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_request(body, None, ["input0"])


def _request(**changes: object) -> dict[str, object]:
    """A valid request for inputs `input0` (JSON) and `scale` (binary, 4 bytes), with entries
    replaced: `input0_<key>`, `scale_<key>`, `output_<key>` or a top-level key."""
    req: dict[str, object] = {"inputs": [
        {"name": "input0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]},
        {"name": "scale", "shape": [1], "datatype": "FP32",
         "parameters": {"binary_data_size": 4}}],
        "outputs": [{"name": "output0"}]}
    entries = {"input0": req["inputs"][0], "scale": req["inputs"][1],  # type: ignore[index]
               "output": req["outputs"][0]}  # type: ignore[index]
    for key, value in changes.items():
        head, _, rest = key.partition("_")
        if head in entries and rest:
            entries[head][rest] = value
        else:
            req[key] = value
    return req


@pytest.mark.parametrize(("changes", "named"), [
    ({"input0_datatype": ["FP32"]}, "datatype ['FP32'] is not supported"),
    ({"input0_datatype": {}}, "datatype {} is not supported"),
    ({"input0_name": ["input0"]}, "unknown input ['input0']"),
    ({"input0_shape": [True, 1]}, "shape must be a list of sizes"),
    ({"scale_parameters": [4]}, "input 'scale': 'parameters' must be an object"),
    ({"scale_parameters": {"binary_data_size": 4.0}}, "binary_data_size 4.0"),
    ({"scale_parameters": {"binary_data_size": True}}, "binary_data_size True"),
    ({"parameters": "binary"}, "the request: 'parameters' must be an object"),
    ({"output_parameters": 1.5}, "output 'output0': 'parameters' must be an object"),
    ({"output_name": ["output0"]}, "needs a 'name' string"),
])
def test_malformed_requests_name_what_is_wrong(codec: str, changes: dict[str, object],
                                               named: str) -> None:
    """Each answers BadRequest (HTTP 400) saying what is wrong, never another error (a 500)."""
    head = json.dumps(_request(**changes)).encode()
    with pytest.raises(BadRequest) as caught:
        decode_request(head + b"\0" * 4, len(head), ["input0", "scale"])
    assert named in str(caught.value)


def test_the_valid_request_of_the_malformed_ones_decodes(codec: str) -> None:
    head = json.dumps(_request()).encode()
    decoded = decode_request(head + b"\0" * 4, len(head), ["input0", "scale"])
    assert decoded.inputs[0].tolist() == [1.0, 2.0] and decoded.outputs == ["output0"]


@pytest.mark.parametrize("body", [b"[" * 100_000,
                                  b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_deeply_nested_json_is_a_bad_request(codec: str, body: bytes) -> None:
    with pytest.raises(BadRequest, match="nested too deeply|not JSON"):
        decode_request(body, None, ["input0"])


# Any request body: JSON built from the protocol's own keys and odd values, or any bytes, with
# or without a header length.
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "shape", "datatype", "data", "parameters", "binary_data_size",
                         "binary_data", "binary_data_output", "inputs", "outputs", "id"]),
        inner, max_size=4),
    max_leaves=16)
_entries = st.fixed_dictionaries(
    {"name": st.sampled_from(["input0", "scale", "other", 0]),
     "shape": st.lists(st.integers(-1, 4), max_size=3) | _values,
     "datatype": st.sampled_from([*protocol.DATATYPES, "BYTES", "fp32", 3])},
    optional={"data": _values | st.lists(st.floats() | st.integers(-3, 3), max_size=12),
              "parameters": _values | st.fixed_dictionaries(
                  {"binary_data_size": st.integers(-4, 48) | _values})})
_requests = st.fixed_dictionaries({"inputs": st.lists(_entries, max_size=3)},
                                  optional={"outputs": _values, "id": _values,
                                            "parameters": _values})


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=_requests | st.binary(max_size=64).map(lambda b: {"raw": b}),
       tail=st.binary(max_size=48), header=st.none() | st.integers(-2, 300))
def test_any_request_decodes_as_declared_or_is_a_bad_request(codec: str, req: dict, tail: bytes,
                                                             header: int | None) -> None:
    """Whatever arrives, the decoder answers BadRequest (HTTP 400) or inputs exactly as the
    request declared them: never another exception (a 500), never a tensor of another shape
    or type."""
    if "raw" in req:
        body = req["raw"]
    else:
        body = json.dumps(req).encode() + tail
        header = header if header is not None or not tail else len(body) - len(tail)
    try:
        decoded = decode_request(body, header, ["input0", "scale"])
    except BadRequest:
        return
    declared = {e["name"]: e for e in json.loads(body[:header] if header else body)["inputs"]}
    for name, t in zip(["input0", "scale"], decoded.inputs):
        entry = declared[name]
        assert t.dtype == protocol.DATATYPES[entry["datatype"]]
        assert list(t.shape) == entry["shape"]
