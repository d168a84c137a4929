"""KServe bodies: v1 (`{"instances": [...]}`) and v2 / Open Inference Protocol (`{"inputs": [...]}`),
translated PER REQUEST of a batch, so KServe requests batch like any other.

* v1: every instance is one model request (a JSON object of the model's fields; for a model whose
  request requires an `image` (cam) a bare base64 string is the image, and `data` is accepted for
  `image` as in TorchServe's KServe examples); the answer is `{"predictions": [one per instance]}`
  (`{"explanations": ...}` on :explain).
* v2: the request's inputs (and its `parameters`, except the reserved ones below) are the model's
  fields, one element each (cam's image: a BYTES input holding base64); the answer is `{"id",
  "model_name", "model_version", "outputs"}` with one JSON output tensor per field of the model's
  JSON answer. Tensors are JSON only: a body in the binary tensor extension's framing is refused
  with a 400 that says how to send JSON.
* Bad input: the request's own HTTP status (400, 503 busy, 500) and `{"error": "<field>: ..."}`
  (the protocol's error shape); the other requests of the batch are answered normally.

handlers/core/answers.py writes the answers; this module holds the translation only.
"""
from __future__ import annotations

import json
from typing import Any

from handlers.core.errors import RequestError


def where(label: str, err: RequestError) -> str:
    """'<field>: message' (v2), 'instances[i].<field>: message' (v1)."""
    name = err.field if err.field not in (None, "body") else None
    if label and name:
        prefix = f"{label}.{name}"
    else:
        prefix = label or name
    return f"{prefix}: {err.message}" if prefix else err.message


def _flatten(value: Any) -> list:
    if isinstance(value, list):
        out = []
        for v in value:
            out += _flatten(v)
        return out
    return [value]


def _v2_value(inp: Any, place: str) -> tuple[str, Any]:
    """One v2 input tensor -> (field name, value); exactly one element."""
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise RequestError(place, "each input must be an object with 'name', 'shape', 'datatype' and 'data'")
    name = inp["name"]
    if "data" not in inp:
        raise RequestError(name, "input has no 'data'")
    values = _flatten(inp["data"])
    if len(values) != 1:
        raise RequestError(name, f"input must hold exactly one element (shape [1]), got {len(values)}")
    value = values[0]
    datatype = str(inp.get("datatype", ""))
    if datatype.startswith("FP") and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # JSON writes 7.0 as 7
    if datatype == "BYTES" and not isinstance(value, str):
        raise RequestError(name, f"BYTES input must hold a string, got {type(value).__name__}")
    return name, value


# Request `parameters` that the protocol and its common extensions (Triton's binary tensor,
# sequence and schedule-policy extensions; KServe's codecs) define: accepted and ignored. Answers
# are always JSON tensors (clients read them whatever they asked for), the models keep no
# sequence state, and the server's own queue and time budget decide order and time.
RESERVED_PARAMETERS = frozenset({"binary_data_output", "sequence_id", "sequence_start", "sequence_end",
                                 "priority", "timeout", "content_type"})
BINARY_REFUSED = ("the binary tensor extension is not supported: send JSON tensors (tritonclient: "
                  "InferInput.set_data_from_numpy(array, binary_data=False))")


def unwrap_v2(body: dict) -> tuple[dict, dict]:
    """A v2 request body -> (the model's fields, metadata: id, requested outputs)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs", "a v2 request needs a non-empty 'inputs' list")
    fields: dict[str, Any] = {}
    for i, inp in enumerate(inputs):
        name, value = _v2_value(inp, f"inputs[{i}]")
        if name in fields:
            raise RequestError(name, "input given twice")
        fields[name] = value
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("parameters", "'parameters' must be an object")
    for name, value in params.items():
        if name in RESERVED_PARAMETERS:
            continue
        if name in fields:
            raise RequestError(name, "given both as an input and as a parameter")
        fields[name] = value
    meta: dict[str, Any] = {"id": body.get("id") if isinstance(body.get("id"), str) and body.get("id").strip() else None}
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise RequestError("outputs", "'outputs' must be a list of objects with a 'name'")
        meta["outputs"] = [o["name"] for o in outputs]
    return fields, meta


def unwrap_v1(body: dict, image_field: str | None, max_instances: int | None) -> list[Any]:
    """A v1 request body -> one model request body per instance."""
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError("instances", "a v1 request needs a non-empty 'instances' list")
    if max_instances and len(instances) > max_instances:
        raise RequestError("instances", f"at most {max_instances} instances per request on this target "
                                        f"(its batchSize), got {len(instances)}")
    bodies = []
    for inst in instances:
        if isinstance(inst, str) and image_field:
            inst = {image_field: inst}
        elif isinstance(inst, dict) and image_field and "data" in inst and image_field not in inst:
            inst = {**{k: v for k, v in inst.items() if k != "data"}, image_field: inst["data"]}
        if isinstance(inst, dict) and image_field and isinstance(inst.get(image_field), dict) \
                and set(inst[image_field]) == {"b64"}:
            inst = {**inst, image_field: inst[image_field]["b64"]}  # TF-serving style {"b64": ...}
        bodies.append(inst)
    return bodies


def image_field(request_type) -> str | None:
    """'image' when the model's request REQUIRES an image (cam): a bare v1 instance string is it."""
    spec = request_type.model_fields.get("image")
    return "image" if spec is not None and spec.is_required() else None


def tensor(name: str, value: Any) -> dict:
    """One field of a model's JSON answer -> a v2 output tensor (JSON text as BYTES otherwise)."""
    values = value if isinstance(value, list) else [value]
    shape = [len(values)]
    if all(isinstance(v, str) for v in values):
        datatype = "BYTES"
    elif all(isinstance(v, bool) for v in values):
        datatype = "BOOL"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        datatype = "INT64"
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        datatype, values = "FP64", [float(v) for v in values]
    else:  # objects, nested lists, nulls: the JSON text
        return {"name": name, "datatype": "BYTES", "shape": [1], "data": [json.dumps(value)],
                "parameters": {"content_type": "application/json"}}
    return {"name": name, "datatype": datatype, "shape": shape, "data": values}
