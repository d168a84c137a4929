"""gRPC requests in-process (no headers at all, as TorchServe's gRPC frontend sends them): the
model's own answer in ONE message marked as the last (`ts_stream_next: false`, which TorchServe
0.12 reads on every StreamPredictions answer), `stream` refused with a 400 naming the field, and
the same answer as /predictions. tests/integration/test_grpc_server.py runs the real client."""
from __future__ import annotations

import json

import pytest

from handlers.adapter.torchserve import TS_STREAM_NEXT
from harness.inprocess import png_bytes
from harness.traffic import without_ids
from weights import digits


def rest_and_grpc(handler, ctx, body) -> tuple:
    """The same body over /predictions and over gRPC in one batch: (rest, grpc) outputs."""
    ctx.request_ids = {0: "rest", 1: "grpc"}
    ctx.new_batch([{}, {}], route=["predictions", "grpc"])
    try:
        out = handler.handle([{"body": body}, {"body": body}], ctx)
        assert [ctx.status(i) for i in range(2)] == [200, 200]
        assert TS_STREAM_NEXT not in ctx.get_response_headers(0)
        assert ctx.get_response_headers(1)[TS_STREAM_NEXT] == "false"
        return tuple(out)
    finally:
        ctx.request_ids = None


@pytest.mark.parametrize("model", ["cam", "ddpm", "sd15"])
def test_grpc_answers_like_rest_in_one_last_message(model, request):
    handler, ctx = request.getfixturevalue(f"{model}_handler")
    body = {"cam": png_bytes(digits.to_pil(digits.load_arrays()[0][0], 64)),
            "ddpm": {"steps": 2, "seed": 5},
            "sd15": {"prompt": "a red square", "steps": 2, "seed": 5, "width": 64, "height": 64}}[model]
    rest, grpc = rest_and_grpc(handler, ctx, body)
    assert without_ids(grpc) == without_ids(rest)


@pytest.mark.parametrize("model", ["ddpm", "sd15"])
def test_stream_over_grpc_is_refused_and_the_batch_goes_on(model, request):
    """A unary gRPC call given more than one message breaks its worker in TorchServe 0.12, and
    the worker cannot tell unary from streaming calls: `stream` over gRPC is a 400 (in the body:
    gRPC's status stays OK); the REST request of the same batch is answered (in-process there is
    no channel to stream to: its final answer only)."""
    handler, ctx = request.getfixturevalue(f"{model}_handler")
    body = {"ddpm": {"steps": 2, "seed": 5, "stream": True},
            "sd15": {"prompt": "a red square", "steps": 2, "seed": 5, "width": 64, "height": 64, "stream": True}}[model]
    ctx.new_batch([{}, {}], route=["grpc", "predictions"])
    grpc, rest = handler.handle([{"body": body}, {"body": body}], ctx)
    err = json.loads(grpc)
    assert ctx.status(0) == 400 and err["field"] == "stream" and "gRPC" in err["error"]
    assert ctx.get_response_headers(0)[TS_STREAM_NEXT] == "false"
    assert ctx.status(1) == 200
    assert len(json.loads(rest)["images"]) == 1
