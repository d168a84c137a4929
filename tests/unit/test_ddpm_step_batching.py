"""Step-level (continuous) batching of the ddpm handler in-process, driven the way TorchServe 0.12's
worker drives a handler under `continuousBatching: true`: successive handle() calls, continuing
requests first with an empty body (`{}`) at whatever index they now have, new arrivals after them
up to the batch size; every message goes through ts's own `create_predict_response`, which calls
`context.stopping_criteria[idx]` and sets the `ts_stream_next` header the frontend acts on.

Checked: seeded requests give the same images alone, in a static batch and joined mid-loop (within
1/255; byte-identical alone), every final body equals the static path's, bad input fails alone,
a request finished in its first call gets an ordinary response (never `True` on its first call).
"""
from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from handlers.adapter.torchserve import TS_STREAM_NEXT
from handlers.ddpm.handler import DdpmHandler
from handlers.ddpm.request import SCHEDULERS
from harness import REPO
from harness.bad_inputs import ddpm_cases
from harness.context import run_batch
from harness.continuous import ContinuousWorker
from harness.inprocess import load_handler, unpack
from harness.traffic import without_ids
from tests.unit.test_ddpm_handler import tiny_pipeline


def images_of(body: bytes | str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))), dtype=int) for b in json.loads(body)["images"]]


def assert_same_response(step_body: bytes | str, static_body: bytes | str) -> None:
    """Same JSON keys in the same order, same values apart from the PNGs, images within 1/255."""
    got, want = json.loads(step_body), json.loads(static_body)
    assert list(got) == list(want)
    assert {k: v for k, v in got.items() if k not in ("images", "trajectory", "request_id")} == \
           {k: v for k, v in want.items() if k not in ("images", "trajectory", "request_id")}
    assert len(got["images"]) == len(want["images"])
    for a, b in zip(images_of(step_body), images_of(static_body)):
        assert np.abs(a - b).max() <= 1


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    """(static handler, its context), (step-level handler, its context): the same tiny UNet with
    the shipped `cpu` and `cpu-step` model configs, both with a float32 UNet (cpu-step's; cpu's
    bfloat16 UNet rounds otherwise); the step-level one with a zero time slice (`step_slice_ms: 0`:
    exactly one step per call, whatever the machine's speed)."""
    root = tmp_path_factory.mktemp("ddpm-step")
    weights = tiny_pipeline(root / "weights")
    same_dtype = {"unet_dtype_cpu": None}
    pair = [load_handler(DdpmHandler, "ddpm", unpack(root / target, "ddpm", weights, target, same_dtype), target)
            for target in ("cpu", "cpu-step")]
    step = pair[1][0]
    assert step.model.step_slice_s == yaml.safe_load((REPO / "model_configs/ddpm/cpu-step.yaml").read_text()
                                               )["handler"]["step_slice_ms"] / 1000 > 0
    step.model.step_slice_s = 0.0
    return pair


def static_alone(handlers, body, headers=None):
    (static, sctx), _ = handlers
    sctx.request_ids = None
    (out,) = run_batch(static, sctx, [{"body": body}], headers=[headers or {}])
    return out, sctx.status(0), sctx.get_response_content_type(0)


MIXED = [  # every scheduler, different steps, eta and num_images
    ("a", {"steps": 8, "seed": 1, "scheduler": "ddim", "eta": 0.5, "num_images": 2}),
    ("b", {"steps": 5, "seed": 2, "scheduler": "ddpm"}),
    ("c", {"steps": 6, "seed": 3, "scheduler": "dpm++", "num_images": 3}),
    ("d", {"steps": 7, "seed": 4, "scheduler": "unipc"}),
    ("e", {"steps": 4, "seed": 5, "scheduler": "euler", "num_images": 2}),
    ("f", {"steps": 9, "seed": 6}),
]


def test_handler_knows_its_mode(handlers):
    (static, _), (step, _) = handlers
    assert static.step_loop is None and step.step_loop is not None
    assert not static.model.stepping and step.model.lane_count == 2  # unet_lanes of cpu-step.yaml


def test_lanes_split_requests_balanced_by_remaining_work(handlers):
    """The lanes: requests (never their images) spread over them by remaining work (images x
    steps left), the most work first, so a long request gets a lane with little else; a request
    alone is one lane, as in the static path."""
    _, (step, _) = handlers

    def flight(images, steps, done=0):
        return SimpleNamespace(x=torch.zeros(images, 1, 2, 2), scheduler=SimpleNamespace(timesteps=[0] * steps), k=done)

    # remaining work 200, 10, 10, 10, 20, 30: the 50-step 4-image request alone in its lane
    flights = [flight(4, 50), flight(1, 10), flight(1, 10), flight(1, 10), flight(2, 10), flight(3, 10)]
    assert step.model.lane_members(flights) == [[0], [1, 2, 3, 4, 5]]
    # steps already taken count: 4 x 5 left = 20 is now less than the 3-image request's 30 (first)
    flights = [flight(4, 50, done=45), flight(1, 10), flight(3, 10)]
    assert step.model.lane_members(flights) == [[2], [0, 1]]
    assert step.model.lane_members(flights[:1]) == [[0]]


def test_lanes_step_on_their_own(handlers):
    """With a time slice, each lane steps its own request (remaining work 40 and 9: one per
    lane): the call ends when one of them has finished (normally the 3-step one; which one
    depends on the machine) and answers it in that call, the other has taken at least one step
    by then, and both answers are the static path's."""
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=4)
    bodies = {"long": {"steps": 40, "seed": 1}, "short": {"steps": 3, "seed": 2, "num_images": 3}}
    step.model.step_slice_s = 60.0  # a slice longer than any loop: each call runs until a request finishes
    try:
        for rid, body in bodies.items():
            worker.submit(rid, body)
        worker.step()
        assert len(worker.live) <= 1 and set(step.step_loop.in_flight) == set(worker.live)  # finished = answered
        assert all(f.k >= 1 for t in step.step_loop.in_flight.values() for f in t.flights.values())
        worker.drain()
    finally:
        step.model.step_slice_s = 0.0
    for rid, body in bodies.items():
        assert worker.answers[rid].status == 200
        assert_same_response(worker.answers[rid].body, static_alone(handlers, body)[0])


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_alone_is_byte_identical_to_static(handlers, scheduler):
    _, (step, ctx) = handlers
    body = {"steps": 5, "seed": 77, "num_images": 2, "scheduler": scheduler}
    worker = ContinuousWorker(step, ctx, batch_size=4)
    worker.submit("r", body)
    worker.drain()
    ans = worker.answers["r"]
    want, _, _ = static_alone(handlers, body)
    assert ans.status == 200 and ans.calls == 5 and ans.streamed
    assert without_ids(ans.body) == without_ids(want)
    assert ans.chunks[:-1] == [b""] * 4  # a client that does not stream sees only the final body
    assert step.step_loop.in_flight == {}


def test_requests_joining_mid_loop_match_alone_and_static_batch(handlers):
    """Arrivals at different steps, batch size 3 (some wait for a free slot); each answer equals
    the request served alone by the static path, and its images those of a static batch."""
    (static, sctx), (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=3)
    arrivals = {0: MIXED[:2], 2: MIXED[2:4], 3: MIXED[4:]}
    for call in range(4):
        for rid, body in arrivals.get(call, []):
            worker.submit(rid, body)
        worker.step()
    worker.drain()
    sctx.request_ids = None
    batch = run_batch(static, sctx, [{"body": body} for _, body in MIXED])
    for (rid, body), in_static_batch in zip(MIXED, batch):
        ans = worker.answers[rid]
        assert ans.status == 200 and ans.content_type == "application/json"
        want, _, _ = static_alone(handlers, body)
        assert_same_response(ans.body, want)
        assert_same_response(ans.body, in_static_batch)
        assert ans.calls == body["steps"]  # one step per call, answered at its last step
    assert max(int(a.headers["X-Batch-Size"]) for a in worker.answers.values()) == 3
    assert step.step_loop.in_flight == {}


def test_bad_input_fails_alone_and_the_others_continue(handlers):
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=16)
    worker.submit("good-1", {"steps": 3, "seed": 0})
    worker.step()
    for name, payload, _ in ddpm_cases():
        worker.submit(name, payload)
    worker.submit("good-2", {"steps": 2, "seed": 0})
    worker.drain()
    for name, payload, fieldname in ddpm_cases():
        ans = worker.answers[name]
        want, status, _ = static_alone(handlers, payload)
        assert (ans.status, ans.calls, ans.streamed) == (400, 1, False), name  # an ordinary 400
        assert ans.body == want.encode() and status == 400
        assert json.loads(ans.body)["field"] == fieldname
    for rid in ("good-1", "good-2"):
        assert worker.answers[rid].status == 200
        want = static_alone(handlers, {"steps": 2 if rid == "good-2" else 3, "seed": 0})[0]
        assert without_ids(worker.answers[rid].body) == without_ids(want)


def test_one_step_request_gets_an_ordinary_response(handlers):
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=4)
    worker.submit("slow", {"steps": 4, "seed": 1})
    worker.submit("one", {"steps": 1, "seed": 1})
    worker.drain()
    one = worker.answers["one"]
    assert (one.status, one.calls, one.streamed) == (200, 1, False)  # stopping criterion None
    assert without_ids(one.body) == without_ids(static_alone(handlers, {"steps": 1, "seed": 1})[0])
    assert worker.answers["slow"].streamed


def test_a_time_slice_runs_steps_until_a_request_finishes(handlers, monkeypatch):
    """With a slice longer than any loop here, each call runs steps (each lane at its own pace)
    until one of its requests has finished; that one is answered in the same call (at once), the
    others continue in the next. So every call answers at least one request, and the answers are
    those of one step per call (the same per-request state, stepped alike)."""
    _, (step, ctx) = handlers
    monkeypatch.setattr(step.model, "step_slice_s", 3600.0)
    worker = ContinuousWorker(step, ctx, batch_size=16)
    for rid, body in MIXED:
        worker.submit(rid, body)
    worker.drain()
    assert worker.calls <= len(MIXED)
    assert {worker.answers[rid].calls for rid, _ in MIXED} == set(range(1, worker.calls + 1))
    for rid, body in MIXED:
        ans = worker.answers[rid]
        assert ans.status == 200
        assert_same_response(ans.body, static_alone(handlers, body)[0])
    streamed = ContinuousWorker(step, ctx, batch_size=16)
    streamed.submit("s", {"steps": 6, "seed": 1, "stream": True, "preview_every": 2})
    streamed.submit("short", {"steps": 2, "seed": 1})
    streamed.drain()
    events = [json.loads(line) for line in streamed.answers["s"].body.decode().splitlines()]
    assert [e["step"] for e in events if e["event"] == "progress"] == [0, 1, 2, 3, 4, 5, 6]  # admission + every step
    assert [e["step"] for e in events if e["event"] == "preview"] == [2, 4]
    assert events[-1]["event"] == "result"
    assert step.step_loop.in_flight == {}


def test_png_and_trajectory_match_static(handlers):
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=4)
    worker.submit("traj", {"steps": 12, "seed": 0, "trajectory": True})
    worker.step()
    worker.submit("png", {"steps": 3, "seed": 0}, headers={"Accept": "image/png"})
    worker.drain()
    png = worker.answers["png"]
    want, _, ctype = static_alone(handlers, {"steps": 3, "seed": 0}, {"Accept": "image/png"})
    assert png.content_type == ctype == "image/png" and png.body == want
    traj = worker.answers["traj"]
    want, _, _ = static_alone(handlers, {"steps": 12, "seed": 0, "trajectory": True})
    assert_same_response(traj.body, want)  # the PNG request joined at step 2: images within 1/255
    gif = Image.open(io.BytesIO(base64.b64decode(json.loads(traj.body)["trajectory"])))
    static_gif = Image.open(io.BytesIO(base64.b64decode(json.loads(want)["trajectory"])))
    assert gif.n_frames == static_gif.n_frames >= 5


def test_state_of_a_dropped_request_is_freed(handlers):
    """A client that closes its connection is removed by the frontend: it is not sent again."""
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=4)
    worker.submit("stays", {"steps": 4, "seed": 1})
    worker.submit("leaves", {"steps": 50, "seed": 2})
    worker.step()
    assert set(step.step_loop.in_flight) == {"stays", "leaves"}
    worker.live.remove("leaves")
    worker.drain()
    assert step.step_loop.in_flight == {}
    assert without_ids(worker.answers["stays"].body) == without_ids(static_alone(handlers, {"steps": 4, "seed": 1})[0])


def test_describe_and_static_calls_still_work_in_step_mode(handlers):
    _, (step, ctx) = handlers
    ctx.request_ids = {0: "describe-1"}
    ctx.new_batch([{"describe": "True"}])
    (out,) = step.handle([{}], ctx)
    assert json.loads(out)["step_level_batching"] is True and ctx.stopping_criteria is None
    # Without request ids (in-process callers, the existing tests) the handler batches statically.
    ctx.request_ids = None
    (out,) = run_batch(step, ctx, [{"body": {"steps": 3, "seed": 9}}])
    assert without_ids(out) == without_ids(static_alone(handlers, {"steps": 3, "seed": 9})[0])



def test_grpc_request_runs_whole_in_its_first_call(handlers):
    """TorchServe 0.12 drops a live gRPC job after its first message under continuous batching:
    a gRPC request arriving while REST requests are in flight is answered whole in the call it
    arrives in (its body the static path's), marked as the last message, and the requests in
    flight go on to their own answers."""
    _, (step, ctx) = handlers
    worker = ContinuousWorker(step, ctx, batch_size=4)
    worker.submit("rest", {"steps": 4, "seed": 1})
    worker.step()
    worker.submit("grpc", {"steps": 3, "seed": 2}, route="grpc")
    worker.drain()
    grpc, rest = worker.answers["grpc"], worker.answers["rest"]
    assert (grpc.status, grpc.calls, grpc.headers[TS_STREAM_NEXT]) == (200, 1, "false")
    assert_same_response(grpc.body, static_alone(handlers, {"steps": 3, "seed": 2})[0])
    assert rest.status == 200 and rest.calls > 1
    assert_same_response(rest.body, static_alone(handlers, {"steps": 4, "seed": 1})[0])
