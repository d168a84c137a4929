"""A small client for TorchServe's own gRPC API (inference on port 7070, management on 7071), built
on TorchServe 0.12.0's protos (clients/protos/) and grpcio. Needs the `grpc` extra.

    with GrpcClient(key_file="key_file.json") as client:
        client.ping()                      # {'status': 'Healthy'}
        client.predict("cam", png_bytes)   # the model's JSON answer, as over POST /predictions/cam

It sends TorchServe's key_file.json tokens (read as clients/api.py reads them) in the
`authorization` metadata that TorchServe's gRPC interceptor checks. TorchServe's gRPC answers
carry no HTTP status: a request the model refuses comes back with status OK and this project's
error body `{"error": ..., "field": ...}`, which the client raises as GrpcRequestError. Errors of
gRPC itself (refused token, unknown model, unreachable server) raise grpc.RpcError.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
from google.protobuf import empty_pb2

from clients.api import Keys, ServerError

PROTOS = Path(__file__).resolve().parent / "protos"
PROTO_FILES = ("inference.proto", "management.proto")
# The *_pb2 modules first: the *_pb2_grpc ones import them.
MODULES = ("inference_pb2", "management_pb2", "inference_pb2_grpc", "management_pb2_grpc")
# gRPC's default of 4 MiB would refuse the larger answers (sd15's images); TorchServe applies its
# own max_response_size.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


class GrpcRequestError(ServerError):
    """A request the model refused, answered over gRPC with the project's error body. `status` is
    None: TorchServe's gRPC answers drop the handler's HTTP status (the body's `field` says what to fix)."""

    def __init__(self, body: dict, where: str):
        self.status = None
        self.body = body
        self.url = where
        field = f" (field '{body['field']}')" if body.get("field") else ""
        RuntimeError.__init__(self, f"gRPC {where}: {body['error']}{field}")


# Generated code at first use rather than vendored: what protoc generates is tied to the protobuf
# runtime it was generated for (newer generated code refuses an older runtime), so it is generated
# by the installed grpcio-tools, for the installed protobuf, and cached per protos and versions.
def cache_dir() -> Path:
    """Where the generated modules of these protos, this grpcio-tools and this protobuf live."""
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update(name.encode() + b"\0" + (PROTOS / name).read_bytes() + b"\0")
    for dist in ("grpcio-tools", "protobuf"):
        digest.update(f"{dist}=={metadata.version(dist)}\0".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "torchserve-models" / "grpc" / digest.hexdigest()[:16]


def generated_dir() -> Path:
    """cache_dir(), compiled first if it does not exist. Generated in a temporary directory next to
    it and renamed into place, so the directory is complete whenever it exists; of two processes
    compiling at once, the second rename fails and its copy is dropped."""
    target = cache_dir()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _compile(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _compile(out: Path) -> None:
    from google.rpc import status_pb2  # googleapis-common-protos: google/rpc/status.proto beside it
    from grpc_tools import protoc  # only needed to compile

    includes = [PROTOS, Path(protoc.__file__).parent / "_proto", Path(status_pb2.__file__).parents[2]]
    args = ["grpc_tools.protoc", *(f"-I{d}" for d in includes), f"--python_out={out}", f"--grpc_python_out={out}",
            *(str(PROTOS / name) for name in PROTO_FILES)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc could not compile {', '.join(PROTO_FILES)} (its errors above)")


@contextlib.contextmanager
def _lent(name: str, module: ModuleType) -> Iterator[None]:
    """sys.modules[name] is `module` for the duration only; the previous entry, if any, comes back."""
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous


_lock = threading.Lock()
_protos: SimpleNamespace | None = None


def protos() -> SimpleNamespace:
    """The generated modules (`.inference_pb2`, `.inference_pb2_grpc`, `.management_pb2`,
    `.management_pb2_grpc`), loaded once per process from generated_dir(). They are loaded from
    their files, not imported through sys.path, so nothing in the cache can shadow another module;
    the *_pb2_grpc modules `import inference_pb2` by plain name, which is lent to them for their
    import only."""
    global _protos
    with _lock:
        if _protos is None:
            directory, loaded = generated_dir(), {}
            for stem in MODULES:
                spec = importlib.util.spec_from_file_location(f"{__name__}.{stem}", directory / f"{stem}.py")
                module = importlib.util.module_from_spec(spec)
                pb2 = stem.removesuffix("_grpc")
                with _lent(pb2, loaded[pb2]) if pb2 != stem else contextlib.nullcontext():
                    spec.loader.exec_module(module)
                loaded[stem] = module
            _protos = SimpleNamespace(**loaded)
        return _protos


def _decoded(prediction: bytes, where: str) -> Any:
    """An answer's JSON, or its bytes when it is not JSON (an image); GrpcRequestError for an error body."""
    try:
        answer = json.loads(prediction)
    except ValueError:
        return prediction
    if isinstance(answer, dict) and "error" in answer:
        raise GrpcRequestError(answer, where)
    return answer


class GrpcClient:
    """TorchServe's gRPC inference and management services. key_file: TorchServe's key_file.json;
    None (or a missing file) sends no token, for a server with token authorization disabled."""

    def __init__(self, address_inference: str = "127.0.0.1:7070", address_management: str = "127.0.0.1:7071",
                 key_file: str | os.PathLike | None = None, timeout: float | None = 120.0):
        self.address_inference = address_inference
        self.keys = Keys.load(key_file)
        self.timeout = timeout
        self.pb = protos()
        self._channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS)
                          for a in (address_inference, address_management)]
        # TorchServe's own service stubs, for the calls this client has no method for
        # (e.g. StreamPredictions2); call them with `metadata=self.metadata(self.keys.inference)`.
        self.inference = self.pb.inference_pb2_grpc.InferenceAPIsServiceStub(self._channels[0])
        self.management = self.pb.management_pb2_grpc.ManagementAPIsServiceStub(self._channels[1])

    @staticmethod
    def metadata(key: str | None) -> list | None:
        """The call metadata TorchServe's token authorization reads."""
        return [("authorization", f"Bearer {key}")] if key else None

    def _call(self, method, request, key: str | None):
        return method(request, metadata=self.metadata(key), timeout=self.timeout)

    def predictions_request(self, model: str, body: dict | bytes, version: str | None = None):
        """A PredictionsRequest: body a dict (sent as JSON) or raw bytes."""
        data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
        return self.pb.inference_pb2.PredictionsRequest(model_name=model, model_version=version or "",
                                                        input={"data": bytes(data)})

    # inference --------------------------------------------------------------------------
    def ping(self) -> dict:
        """TorchServe's health, as GET /ping answers it: {'status': 'Healthy'}."""
        return json.loads(self._call(self.inference.Ping, empty_pb2.Empty(), self.keys.inference).health)

    def predict(self, model: str, body: dict | bytes, version: str | None = None) -> dict | bytes:
        """One Predictions call. body: a dict (sent as JSON) or raw bytes (a PNG). Returns the
        answer's JSON, or its bytes when it is not JSON; GrpcRequestError when the model refused it."""
        reply = self._call(self.inference.Predictions, self.predictions_request(model, body, version), self.keys.inference)
        return _decoded(reply.prediction, f"Predictions {model}@{self.address_inference}")

    def stream_predictions(self, model: str, body: dict | bytes, version: str | None = None) -> Iterator[bytes]:
        """StreamPredictions: each message's prediction bytes (GrpcRequestError for an error body)."""
        replies = self._call(self.inference.StreamPredictions, self.predictions_request(model, body, version),
                             self.keys.inference)
        for reply in replies:
            _decoded(reply.prediction, f"StreamPredictions {model}@{self.address_inference}")
            yield reply.prediction

    # management -------------------------------------------------------------------------
    def describe(self, model: str, version: str | None = None, customized: bool = False) -> list:
        """DescribeModel: the same JSON as GET /models/<model>[?customized=true] (one entry per version)."""
        request = self.pb.management_pb2.DescribeModelRequest(model_name=model, model_version=version or "",
                                                              customized=customized)
        return json.loads(self._call(self.management.DescribeModel, request, self.keys.management).msg)

    def list_models(self, page_size: int = 100) -> list[dict]:
        """Every registered model ({'modelName', 'modelUrl'}), page after page. The pages are asked for
        explicitly: `limit` is 0 when a proto3 request leaves it out, and TorchServe answers a
        ListModels call without a limit with an empty list (and more than 100 counts as 100)."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        models, token = [], 0
        while True:
            request = self.pb.management_pb2.ListModelsRequest(limit=page_size, next_page_token=token)
            page = json.loads(self._call(self.management.ListModels, request, self.keys.management).msg)
            models += page.get("models", [])
            if "nextPageToken" not in page:
                return models
            token = int(page["nextPageToken"])

    # lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
