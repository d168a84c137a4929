"""The TorchServe side of every model: a `BaseHandler` subclass that turns TorchServe's batch and
context into core requests (handlers/core/batch.py `Incoming`) and the core's replies back into
TorchServe responses. A model's entry module (handlers/<model>/handler.py) subclasses it with
its `model_type`.

`BaseHandler.handle` stays the entry point on every path, so describe
(`GET /models/<m>?customized=true`), explain, the profiler and TorchServe's `HandlerTime` metric
work as TorchServe documents; under continuous batching one handle() call runs one time slice,
so HandlerTime times a slice, not a whole request.

Routes are told apart per request: `/predictions` and `/explanations` requests carry a
`url_path` header, the KServe v1 / v2 routes do not (their body says which: `instances` or
`inputs`), and gRPC requests carry no headers at all. A gRPC request is answered like
`/predictions`, in one message that says it is the last (`ts_stream_next: false`): TorchServe
0.12's gRPC job reads that header on every answer to a StreamPredictions call without a null
check, and the worker dies of the NullPointerException (docs/protocols.md).
"""
from __future__ import annotations

import json
import os

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handlers.adapter import envelope
from handlers.core.answers import Reply
from handlers.core.batch import GRPC, KSERVE_V1, KSERVE_V2, REST, Incoming
from handlers.core.bodies import FormFields
from handlers.core.jobs import Jobs
from handlers.core.loops import Server, StaticLoop, StepLoop
from handlers.core.model import ServedModel, select_device

TS_STREAM_NEXT = "ts_stream_next"  # TorchServe's header: "true" = more messages follow
BINARY_HEADER = "inference-header-content-length"  # KServe v2's binary tensor extension


def headers_of(context, idx: int) -> dict[str, str]:
    """A request's headers with lower-cased names (TorchServe keeps the client's spelling)."""
    return {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()
            if isinstance(k, str) and isinstance(v, str)}


def protocol_of(headers: dict[str, str], body) -> str:
    """REST for /predictions, /explanations (a `url_path` header), gRPC (no headers); else the
    KServe route the body belongs to (the envelope's, when TorchServe runs one)."""
    if "url_path" in headers:
        return REST
    if not headers:
        return GRPC
    if envelope.active() is not None:
        return envelope.active()
    return KSERVE_V2 if BINARY_HEADER in headers or isinstance(body, dict) and "inputs" in body else KSERVE_V1


def incoming(context, idx: int, row) -> Incoming:
    """One row of TorchServe's batch -> a core request."""
    if not isinstance(row, dict):
        body = row
    elif "body" in row or "data" in row:
        body = row.get("body", row.get("data"))
    else:  # form fields (curl -d without a Content-Type), or nothing
        body = FormFields(row) if row else None
    headers = headers_of(context, idx)
    ids = getattr(context, "request_ids", None) or {}
    return Incoming(idx, body, protocol_of(headers, body), request_id=ids.get(idx),
                    accept=headers.get("accept", ""), explain=headers.get("explain") == "True",
                    binary_tensors=BINARY_HEADER in headers)


class Channel:
    """Sends streamed messages of one batch with TorchServe's intermediate responses."""

    def __init__(self, context, batch_size: int):
        self.context = context
        self.batch_size = batch_size

    def open(self, idx: int, head: Reply) -> None:
        apply_head(self.context, idx, head)

    def send(self, chunks: dict[int, bytes]) -> None:
        ret = [b""] * self.batch_size
        for idx, chunk in chunks.items():
            ret[idx] = chunk
        req_id_map = {idx: self.context.request_ids[idx] for idx in chunks}
        # code 200 for the whole message: a non-200 intermediate code breaks the other streams of
        # the batch; a request's own errors go in-band.
        send_intermediate_predict_response(ret, req_id_map, "Intermediate Prediction success", 200, self.context)


def apply_head(context, idx: int, reply: Reply) -> None:
    """A reply's status, content type and headers onto TorchServe's response for request idx."""
    for key, value in reply.headers.items():
        context.set_response_header(idx, key, value)
    if reply.status != 200:
        context.set_response_status(reply.status, reply.reason, idx)
    context.set_response_content_type(idx, reply.content_type)


class TorchServeHandler(BaseHandler):
    """preprocess (rows -> core requests) -> inference (a core loop) -> postprocess (replies ->
    TorchServe's response), for the model class `model_type`."""

    model_type: type[ServedModel]

    def initialize(self, context):
        self.context = context
        yaml = context.model_yaml_config or {}
        config = dict(yaml.get("handler") or {})
        device, dtype = select_device(context.system_properties.get("gpu_id"), config)
        weights = os.path.join(context.system_properties["model_dir"], "weights")
        if not os.path.isdir(weights):
            raise FileNotFoundError(f"weights directory missing from the archive: {weights}")
        self.model = self.model_type(weights, config, device, dtype, float(yaml["responseTimeout"]))
        manifest = (getattr(context, "manifest", None) or {}).get("model") or {}
        self.model.archive = {"model": manifest.get("modelName", context.model_name),
                              "version": manifest.get("modelVersion"), **self.archive_info()}
        name = manifest.get("modelName", context.model_name)
        # Models whose requests have ids (the generation models) track them: handlers/core/jobs.py.
        ids = "request_id" in self.model.request.model_fields
        jobs = Jobs(name, status_keep_s=float(config["job_status_keep_s"])) if ids else None
        server = Server(name, manifest.get("modelVersion"), int(yaml.get("batchSize", 0) or 0) or None, jobs)
        self.static_loop = StaticLoop(self.model, server)
        self.step_loop = StepLoop(self.model, server) if yaml.get("continuousBatching") else None  # ValueError without step hooks
        envelope.pass_through(TorchServeHandler)
        self.initialized = True

    def handle(self, data, context):
        # TorchServe sends a stream chunk whenever stopping_criteria is set: only a step-level
        # call sets it, for that call.
        context.stopping_criteria = None
        return super().handle(data, context)

    def preprocess(self, data: list) -> list[Incoming]:
        return [incoming(self.context, idx, row) for idx, row in enumerate(data)]

    def inference(self, batch: list[Incoming], *args, **kwargs) -> list[Reply]:
        ids = getattr(self.context, "request_ids", None)
        if self.step_loop is not None and ids:
            messages = self.step_loop.run(batch)
            self.context.stopping_criteria = [lambda _ret, ended=ended: ended for _, ended in messages]
            replies = [reply for reply, _ in messages]
        else:
            # In-process callers have no request ids: nothing to stream to, nothing comes back.
            replies = self.static_loop.run(batch, Channel(self.context, len(batch)) if ids else None)
        for inc, reply in zip(batch, replies):
            if inc.protocol == GRPC:
                reply.headers[TS_STREAM_NEXT] = "false"  # the one and last message (module docstring)
        return replies

    def postprocess(self, replies: list[Reply]) -> list:
        for idx, reply in enumerate(replies):
            if reply.head:
                apply_head(self.context, idx, reply)
        return [reply.body for reply in replies]

    def explain_handle(self, data_preprocess, raw_data):
        """`POST /explanations/<model>`: the same path; each request's `explain` flag picks its answer."""
        return self.postprocess(self.inference(data_preprocess))

    def describe_handle(self) -> str:
        """`GET /models/<model>?customized=true`: what this archive accepts and what it is."""
        manifest = (getattr(self.context, "manifest", None) or {}).get("model") or {}
        info = self.archive_info()
        return json.dumps({"model": self.context.model_name, "version": manifest.get("modelVersion"),
                           "profile": info["profile"], "target": info["target"], **self.model.describe()})

    def archive_info(self) -> dict:
        """What archive.sh wrote into the archive (archive.json): profile, target, the archive's
        fingerprint and its weights' sha256; None each when the archive has no archive.json."""
        path = os.path.join(self.context.system_properties["model_dir"], "archive.json")
        info = {}
        if os.path.isfile(path):
            with open(path) as f:
                info = json.load(f)
        return {key: info.get(key) for key in ("profile", "target", "fingerprint", "weights_sha256")}
