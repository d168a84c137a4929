"""The gRPC client's protos (clients/protos/) are the installed TorchServe's, byte for byte, and
compile into modules that expose TorchServe's services, once per protos and versions (a second
load reuses the cache). No server: tests/integration runs the client against one."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import ts
from grpc_tools import protoc

from clients import grpc_api

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"


@pytest.mark.parametrize("name", grpc_api.PROTO_FILES)
def test_vendored_protos_are_the_installed_torchserves(name):
    with zipfile.ZipFile(JAR) as jar:
        shipped = jar.read(name)
    assert (grpc_api.PROTOS / name).read_bytes() == shipped, (
        f"clients/protos/{name} differs from {name} in {JAR}: copy it again (clients/protos/README.md)")


def test_generated_modules_expose_the_services():
    pb = grpc_api.protos()
    assert hasattr(pb.inference_pb2_grpc, "InferenceAPIsServiceStub")
    assert hasattr(pb.management_pb2_grpc, "ManagementAPIsServiceStub")
    request = pb.inference_pb2.PredictionsRequest(model_name="cam", input={"data": b"{}"})
    assert pb.inference_pb2.PredictionsRequest.FromString(request.SerializeToString()) == request
    assert pb.management_pb2.ListModelsRequest(limit=5).limit == 5


def test_compiled_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = grpc_api.generated_dir()
    assert first.parent == tmp_path / "torchserve-models" / "grpc"
    assert sorted(p.name for p in first.glob("*.py")) == sorted(f"{m}.py" for m in grpc_api.MODULES)
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left behind
    stamp = first.stat().st_ino, first.stat().st_mtime_ns

    def no_compile(args):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(protoc, "main", no_compile)
    assert grpc_api.generated_dir() == first
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp
