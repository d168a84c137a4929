"""KServe bodies for every BatchedHandler: v1 (`{"instances": [...]}`) and v2 / Open Inference
Protocol (`{"inputs": [...]}`), translated PER REQUEST of a TorchServe batch.

KServe's TorchServe runtime sets `TS_SERVICE_ENVELOPE=kserve|kservev2` (global for all models);
TorchServe then wraps the handler's entry point in `ts.torch_handler.request_envelope.kserve` /
`kservev2`. Both stock envelopes read only the FIRST request of a batch and return ONE response
for the whole batch, so with batchSize > 1 ts/service.py answers every request of a batch of 2+
with 503 "number of batch response mismatched" (measured: docs/SCALING.md). Instead of running
every model at batchSize 1, `install_passthrough()` (run when this module is imported, i.e. in
the worker of a model whose handler is a BatchedHandler) makes those two envelope classes hand
the raw batch straight to a handler that declares `kserve_native = True`, with the protocol in
`handler.kserve_protocol`; any other handler keeps the stock envelope. The handler then unwraps
each request here, runs the usual grouping / batching / per-request errors, and wraps each
request's answer in its protocol's response shape:

* v1: every instance is one model request (a JSON object of the model's fields; for cam a bare
  base64 string is the image, and `data` is accepted for `image` as in TorchServe's KServe
  examples); answer `{"predictions": [one per instance]}` (`{"explanations": ...}` on :explain).
* v2: the request's inputs (and its `parameters`) are the model's fields, one element each
  (cam's image: a BYTES input holding base64); answer `{"id", "model_name", "model_version",
  "outputs"}` with one output tensor per field of the model's JSON answer.
* Bad input: the request's own HTTP status (400, 503 busy, 500) and `{"error": "<field>: ..."}`
  (the protocol's error shape), other requests of the batch are answered normally.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from handlers.core.errors import RequestError, set_error_status

logger = logging.getLogger(__name__)

V1 = "kserve"
V2 = "kservev2"
PROTOCOLS = (V1, V2)


def install_passthrough() -> bool:
    """Lets TorchServe's KServe envelopes pass the whole batch to `kserve_native` handlers.

    The envelope instance wraps `model_service.handle` (ts/model_loader.py); this replaces
    `handle` on the two envelope classes, once per process. Returns False when this TorchServe
    has no such envelopes.
    """
    try:
        from ts.torch_handler.request_envelope.kserve import KServeEnvelope
        from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope
    except ImportError:  # pragma: no cover - TorchServe without KServe support
        return False
    for cls, protocol in ((KServeEnvelope, V1), (KServev2Envelope, V2)):
        if getattr(cls.handle, "kserve_passthrough", False):
            continue
        stock = cls.handle

        def handle(self, data, context, _stock=stock, _protocol=protocol):
            owner = getattr(self._handle_fn, "__self__", None)
            if getattr(owner, "kserve_native", False):
                self.context = context
                owner.kserve_protocol = _protocol
                return self._handle_fn(data, context)
            return _stock(self, data, context)

        handle.kserve_passthrough = True
        cls.handle = handle
    return True


# --- request side ---------------------------------------------------------------------------
@dataclass
class HttpRequest:
    """One HTTP request of the TorchServe batch: its model requests (flat indexes) or its error."""

    idx: int
    members: list[tuple[str, int]] = field(default_factory=list)  # (label for errors, flat index)
    error: RequestError | None = None
    explain: bool = False
    request_id: str | None = None
    wanted_outputs: list[str] | None = None


def _where(label: str, err: RequestError) -> str:
    """'<field>: message' (v2), 'instances[i].<field>: message' (v1)."""
    name = err.field if err.field not in (None, "body") else None
    if label and name:
        prefix = f"{label}.{name}"
    else:
        prefix = label or name
    return f"{prefix}: {err.message}" if prefix else err.message


def _json_object(row: Any) -> dict:
    from handlers.adapter.torchserve import json_body

    return json_body(row)


def _flatten(value: Any) -> list:
    if isinstance(value, list):
        out = []
        for v in value:
            out += _flatten(v)
        return out
    return [value]


def _v2_value(inp: Any, where: str) -> tuple[str, Any]:
    """One v2 input tensor -> (field name, value); exactly one element."""
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise RequestError(where, "each input must be an object with 'name', 'shape', 'datatype' and 'data'")
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


def _image_field(handler) -> str | None:
    """'image' when the model's request REQUIRES an image (cam): a bare v1 instance string is it."""
    spec = getattr(handler.request, "model_fields", {}).get("image")
    return "image" if spec is not None and spec.is_required() else None


def preprocess(handler, data: list) -> list:
    """The batch -> a flat list of Pending / RequestError (one per model request), remembering
    which HTTP request each came from (handler._kserve_batch)."""
    from handlers.adapter.torchserve import Pending, header

    protocol = handler.kserve_protocol
    ctx = handler.context
    image_field = _image_field(handler)
    max_instances = int((getattr(ctx, "model_yaml_config", None) or {}).get("batchSize", 0) or 0) or None
    batch: list[HttpRequest] = []
    flat: list = []
    for idx, row in enumerate(data):
        req = HttpRequest(idx, explain=header(ctx, idx, "explain") == "True")
        batch.append(req)
        try:
            body = _json_object(row)
            if protocol == V2:
                fields, meta = unwrap_v2(body)
                req.request_id, req.wanted_outputs = meta["id"], meta.get("outputs")
                bodies = [("", fields)]
            else:
                bodies = [(f"instances[{i}]", b) for i, b in enumerate(unwrap_v1(body, image_field, max_instances))]
        except RequestError as err:
            req.error = err
            continue
        for label, one in bodies:
            try:
                if not isinstance(one, dict):
                    raise RequestError(None, f"must be a JSON object of the model's fields, got {type(one).__name__}")
                params = handler.parse({"body": one})
                if getattr(params, "stream", False):  # KServe's protocols answer once per request
                    raise RequestError("stream", "'stream' is not available over the KServe protocol; "
                                                 "use /predictions/<model> for NDJSON progress events")
                handler.check_cost(params)
                item = Pending(len(flat), params, png=False, explain=req.explain)
            except RequestError as err:
                item = err
            req.members.append((label, len(flat)))
            flat.append(item)
    handler._kserve_batch = batch
    return flat


# --- response side --------------------------------------------------------------------------
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


def _fail(handler, idx: int, err: RequestError, message: str) -> str:
    from handlers.adapter.torchserve import JSON_TYPE

    set_error_status(handler.context, idx, err)
    handler.context.set_response_content_type(idx, JSON_TYPE)
    return json.dumps({"error": message})


def postprocess(handler, outcomes: list) -> list:
    """Flat outcomes -> one protocol response per HTTP request of the batch."""
    from handlers.adapter.torchserve import JSON_TYPE

    ctx = handler.context
    out = []
    for req in handler._kserve_batch:
        ctx.set_response_header(req.idx, "X-Batch-Size", str(len(handler._kserve_batch)))
        if req.error is not None:
            out.append(_fail(handler, req.idx, req.error, _where("", req.error)))
            continue
        failed = [(label, outcomes[i].error) for label, i in req.members if outcomes[i].error is not None]
        if failed:
            label, err = failed[0]
            out.append(_fail(handler, req.idx, err, _where(label, err)))
            continue
        answers = [outcomes[i] for _, i in req.members]
        for oc in answers:
            for key, value in oc.headers.items():
                ctx.set_response_header(req.idx, key, value)
        if handler.kserve_protocol == V1:
            body = {"explanations" if req.explain else "predictions": [oc.response for oc in answers]}
        else:
            response = answers[0].response
            tensors = [tensor(k, v) for k, v in response.items()]
            if req.wanted_outputs is not None:
                known = {t["name"] for t in tensors}
                unknown = [n for n in req.wanted_outputs if n not in known]
                if unknown:
                    err = RequestError("outputs", f"unknown output {unknown[0]!r} (this model answers {sorted(known)})")
                    out.append(_fail(handler, req.idx, err, _where("", err)))
                    continue
                tensors = [t for t in tensors if t["name"] in req.wanted_outputs]
            manifest = (getattr(ctx, "manifest", None) or {}).get("model") or {}
            body = {"id": req.request_id or ctx.get_request_id(req.idx),
                    "model_name": manifest.get("modelName", ctx.model_name),
                    "model_version": manifest.get("modelVersion"), "outputs": tensors}
        ctx.set_response_content_type(req.idx, JSON_TYPE)
        out.append(json.dumps(body))
    handler._kserve_batch = []
    return out


# KSERVE_STOCK_ENVELOPE=1 keeps TorchServe's own envelopes (to measure what they do; see tests).
if os.environ.get("KSERVE_STOCK_ENVELOPE") != "1":
    install_passthrough()
