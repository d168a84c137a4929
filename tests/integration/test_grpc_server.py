"""TorchServe's gRPC doors with their real client: TorchServe 0.12.0's own protos compiled with
grpcio (clients/grpc_api.py), against a real TorchServe serving the three demo archives.

Checked: answers equal /predictions for every model, over Predictions and StreamPredictions (one
message); bad input comes back with status OK and the `{"error", "field"}` body, which the client
raises; `stream` over gRPC is refused (TorchServe cannot tell a unary call from a streaming one);
DescribeModel and paged ListModels; and after each call that broke workers before
(docs/protocols.md) every worker listed READY has a live process, each model has all its
workers, and every model answers.
"""
from __future__ import annotations

import json

import grpc
import psutil
import pytest
import yaml

from clients.grpc_api import GrpcRequestError
from harness import REPO
from harness.inprocess import png_bytes
from harness.torchserve import TorchServeInstance
from harness.traffic import without_ids
from weights import digits

MODELS = ("cam", "ddpm", "sd15")
REQUESTS = {
    "cam": png_bytes(digits.to_pil(digits.load_arrays()[0][0], 64)),
    "ddpm": {"steps": 2, "seed": 5},
    "sd15": {"prompt": "a red square", "steps": 2, "seed": 5, "width": 64, "height": 64},
}


@pytest.fixture(scope="module")
def ts():
    with TorchServeInstance(archives=["cam.mar", "ddpm.mar", "sd15"]) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_client(ts):
    with ts.make_grpc_client() as client:
        yield client


def rest(ts, model: str, body) -> dict:
    return ts.client.predict(model, body)


def assert_every_worker_alive_and_every_model_answers(ts, grpc_client) -> None:
    for model in MODELS:
        config = yaml.safe_load((REPO / "model_configs" / model / "cpu.yaml").read_text())
        workers = [w for d in ts.client.describe(model) for w in d["workers"]]
        ready = [w for w in workers if w["status"] == "READY"]
        assert all(psutil.pid_exists(w["pid"]) for w in ready), (model, workers)
        assert len(ready) == config["minWorkers"], (model, workers)
        assert without_ids(grpc_client.predict(model, REQUESTS[model])) == without_ids(rest(ts, model, REQUESTS[model]))


@pytest.mark.parametrize("model", MODELS)
def test_predictions_equal_rest(ts, grpc_client, model):
    assert without_ids(grpc_client.predict(model, REQUESTS[model])) == without_ids(rest(ts, model, REQUESTS[model]))


@pytest.mark.parametrize("model", MODELS)
def test_stream_predictions_give_one_message_equal_to_rest(ts, grpc_client, model):
    """An ordinary request over StreamPredictions killed its worker (TorchServe's NPE on a missing
    ts_stream_next header): now it is one message, the /predictions answer."""
    messages = list(grpc_client.stream_predictions(model, REQUESTS[model]))
    assert [without_ids(m) for m in messages] == [without_ids(rest(ts, model, REQUESTS[model]))]
    assert_every_worker_alive_and_every_model_answers(ts, grpc_client)


@pytest.mark.parametrize("call", ["predict", "stream_predictions"])
def test_stream_request_over_grpc_is_refused_and_breaks_nothing(ts, grpc_client, call):
    """A unary call with "stream": true left a dead worker listed READY (or blocked a backend
    event loop): now both gRPC calls get the 400 body naming `stream`."""
    with pytest.raises(GrpcRequestError) as exc:
        list(getattr(grpc_client, call)("ddpm", {"steps": 3, "seed": 1, "stream": True}))
    assert exc.value.body["field"] == "stream" and "gRPC" in exc.value.body["error"]
    assert_every_worker_alive_and_every_model_answers(ts, grpc_client)


@pytest.mark.parametrize("sequence_id", ["", "seq-1"])
def test_stream_predictions2_fails_in_the_frontend_and_breaks_nothing(ts, grpc_client, sequence_id):
    """StreamPredictions2 is for sequence batching, which these models do not use: TorchServe 0.12
    answers it with nothing (one empty message without a sequence id, an UNKNOWN error with one),
    and no worker is harmed."""
    request = grpc_client.predictions_request("ddpm", REQUESTS["ddpm"])
    request.sequence_id = sequence_id
    metadata = grpc_client.metadata(grpc_client.keys.inference)
    try:
        answers = [m.prediction for m in grpc_client.inference.StreamPredictions2(iter([request]),
                                                                                  metadata=metadata, timeout=60)]
    except grpc.RpcError as err:
        answers = [err.code()]
    assert answers in ([b""], [grpc.StatusCode.UNKNOWN], [grpc.StatusCode.INTERNAL]), answers
    assert_every_worker_alive_and_every_model_answers(ts, grpc_client)


def test_bad_input_is_an_ok_status_with_the_error_body(ts, grpc_client):
    """TorchServe's gRPC job drops the status code: the body is the error, as over REST."""
    raw = grpc_client.inference.Predictions(grpc_client.predictions_request("ddpm", {"steps": 0}),
                                            metadata=grpc_client.metadata(grpc_client.keys.inference), timeout=60)
    body = json.loads(raw.prediction)
    assert body["field"] == "steps" and body["error"]
    with pytest.raises(GrpcRequestError) as exc:
        grpc_client.predict("ddpm", {"steps": 0})
    assert exc.value.body == body and "steps" in str(exc.value)
    with pytest.raises(GrpcRequestError) as exc:
        grpc_client.predict("cam", b"not an image")
    assert exc.value.body["field"] == "body"  # as over REST: the bytes are not an image


def test_token_is_required(ts):
    with ts.make_grpc_client() as client:
        client.keys.inference = "wrong"
        with pytest.raises(grpc.RpcError) as exc:
            client.predict("ddpm", REQUESTS["ddpm"])
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_management_calls(ts, grpc_client):
    """DescribeModel as GET /models/<m>; ListModels paged (a call without `limit` lists nothing)."""
    for model in MODELS:
        described = grpc_client.describe(model)
        assert [d["modelName"] for d in described] == [model]
        assert described[0]["batchSize"] == ts.client.describe(model)[0]["batchSize"]
    for page_size in (1, 2, 100):
        assert sorted(m["modelName"] for m in grpc_client.list_models(page_size)) == sorted(MODELS)
    pb = grpc_client.pb.management_pb2
    raw = grpc_client.management.ListModels(pb.ListModelsRequest(), timeout=30,
                                            metadata=grpc_client.metadata(grpc_client.keys.management))
    assert json.loads(raw.msg)["models"] == []
