"""Step-level batching of ddpm against a real TorchServe: the archive built by archive.sh with
its `cpu-step` target (`continuousBatching: true`, `ddpm_step`) beside the same archive with the
`cpu` target (static batching, `ddpm_static`), served by one private TorchServe. Requests join
the loop while others run; every answer must equal the static server's (byte for byte alone but for its request id,
images within 1/255 in company).

TorchServe 0.12 re-queues a describe job (`GET /models/ddpm_step?customized=true`) of a
continuous-batching model forever and the worker serves nothing else (docs/development.md): the
project's client never sends it one (checked here); the handler's describe path is tested
in-process."""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from harness import REPO
from harness.torchserve import TorchServeInstance, model_configs_with, run_archive_sh
from harness.traffic import without_ids

VARIANTS = {"ddpm_static": "cpu", "ddpm_step": "cpu-step"}  # model name: target
# Byte-for-byte comparisons ask for bare PNGs: a PNG's `serving` record names the archive that made
# it, which differs between the two (test_pngs_record_their_own_archive checks the rest is equal).
BARE = {"metadata": False}


def build_archive(store, name: str, target: str, configs) -> None:
    """archive.sh --target T under model name `name` into `store`."""
    run = run_archive_sh("--target", target, "--store", str(store), "--name", name, "ddpm", model_configs=configs)
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("ddpm-step-store")
    # The static archive with cpu-step's float32 UNet (cpu.yaml's bfloat16 UNet rounds otherwise).
    configs = model_configs_with(tmp_path_factory.mktemp("configs") / "model_configs", {("ddpm", "cpu"): {
        "unet_dtype_cpu": yaml.safe_load((REPO / "model_configs/ddpm/cpu-step.yaml").read_text())["handler"]["unet_dtype_cpu"]}})
    for name, target in VARIANTS.items():
        build_archive(store, name, target, configs)
    with TorchServeInstance(archives=[f"{n}.mar" for n in VARIANTS], source_store=store, load_at_start=False) as ts:
        for name in VARIANTS:  # the same batch size for both; workers and threads from each config
            ts.client.register(f"{name}.mar", batch_size=8, max_batch_delay=100)
        ts.client.wait_ready(list(VARIANTS), timeout=180)
        yield ts


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=int)


def assert_same(step: dict, static: dict) -> None:
    assert list(step) == list(static)
    assert {k: v for k, v in step.items() if k not in ("images", "request_id")} == \
        {k: v for k, v in static.items() if k not in ("images", "request_id")}
    assert len(step["images"]) == len(static["images"])
    for a, b in zip(step["images"], static["images"]):
        assert np.abs(decode(a) - decode(b)).max() <= 1


def test_seeded_request_alone_is_byte_identical(server):
    req = {"steps": 10, "seed": 2024, "num_images": 2, "scheduler": "dpm++", **BARE}
    step = server.client.predict_raw("ddpm_step", req)
    static = server.client.predict_raw("ddpm_static", req)
    assert step.status_code == static.status_code == 200
    assert without_ids(step.content) == without_ids(static.content)  # a client that does not stream sees the final body only


def test_grpc_requests_are_answered_whole_beside_the_loop(server):
    """TorchServe 0.12 drops a live gRPC job after its first message under continuous batching:
    a gRPC request arriving while a REST request is in the loop is answered whole (the static
    answer, byte for byte), over Predictions and StreamPredictions, and the REST one finishes."""
    long = {"steps": 40, "seed": 8, "scheduler": "ddpm", **BARE}
    short = {"steps": 6, "seed": 9, "scheduler": "ddim", **BARE}
    with ThreadPoolExecutor(1) as pool, server.make_grpc_client() as grpc_client:
        running = pool.submit(server.client.predict_raw, "ddpm_step", long)
        time.sleep(0.3)
        unary = grpc_client.predict("ddpm_step", short)
        streamed = list(grpc_client.stream_predictions("ddpm_step", short))
        assert without_ids(running.result().content) == without_ids(server.client.predict_raw("ddpm_static", long).content)
    static = server.client.predict_raw("ddpm_static", short)
    assert without_ids(unary) == without_ids(static.json())
    assert [without_ids(m) for m in streamed] == [without_ids(static.content)]


def test_requests_joining_mid_loop_match_static(server):
    """A long request runs; the others arrive while it is denoising and share its UNet calls."""
    payloads = [{"steps": 60, "seed": 1, "scheduler": "ddpm"},
                {"steps": 10, "seed": 2, "scheduler": "ddim", "eta": 0.5, "num_images": 3},
                {"steps": 25, "seed": 3, "scheduler": "unipc"},
                {"steps": 10, "seed": 4, "scheduler": "euler"}, {"steps": 50, "seed": 5, "scheduler": "dpm++"},
                {"steps": 1, "seed": 6}, {"steps": 0}]

    def call(i):
        time.sleep(0.05 * i)  # staggered arrivals: most join a loop already running
        return server.client.predict_raw("ddpm_step", payloads[i])

    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(call, range(len(payloads))))
    assert [r.status_code for r in responses] == [200] * 6 + [400]
    assert responses[-1].json()["field"] == "steps"
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    for payload, resp in zip(payloads[:-1], responses):
        assert_same(resp.json(), server.client.predict("ddpm_static", payload))
    # a request finished in its first call is an ordinary response; the others were streamed
    assert "content-length" in {k.lower() for k in responses[5].headers}
    assert responses[0].headers.get("transfer-encoding") == "chunked"


def test_pngs_record_their_own_archive(server):
    """With metadata, the same request's PNGs from the two archives have the same pixels and the
    same record, but for the fields that name the archive."""
    req = {"steps": 5, "seed": 12, "num_images": 2}
    made = {}
    for name in VARIANTS:
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in server.client.predict(name, req)["images"]]
        made[name] = [(img.tobytes(), json.loads(img.text["serving"])) for img in images]
    for (pixels, step), (static_pixels, static) in zip(made["ddpm_step"], made["ddpm_static"]):
        assert pixels == static_pixels
        assert (step["model"], step["target"], static["model"], static["target"]) == \
            ("ddpm_step", "cpu-step", "ddpm_static", "cpu")
        assert step["fingerprint"] != static["fingerprint"]
        named = ("model", "target", "fingerprint")
        assert {k: v for k, v in step.items() if k not in named} == {k: v for k, v in static.items() if k not in named}


def test_png_response(server):
    raw = server.client.predict_raw("ddpm_step", {"steps": 3, "seed": 0, **BARE}, accept="image/png")
    static = server.client.predict_raw("ddpm_static", {"steps": 3, "seed": 0, **BARE}, accept="image/png")
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.content == static.content


def test_streaming_client_gets_only_the_final_body(server):
    client = server.client
    url = f"{client.inference_url}/predictions/ddpm_step"
    headers = {"Authorization": f"Bearer {client.keys.inference}"}
    with requests.post(url, json={"steps": 8, "seed": 3, **BARE}, headers=headers, stream=True, timeout=120) as resp:
        chunks = [c for c in resp.iter_content(chunk_size=None) if c]
    assert resp.status_code == 200
    static = client.predict_raw("ddpm_static", {"steps": 8, "seed": 3, **BARE})
    assert without_ids(b"".join(chunks)) == without_ids(static.content)


def test_streaming_request_gets_one_event_per_step(server):
    """Under step-level batching every handle() call runs one or more steps (a time slice): a
    `"stream": true` request gets a step-0 event on admission, then each step's progress event
    (and previews) in the call's message, and last the static server's response to the same
    request; an ordinary request in flight with it still gets only its body."""
    payload = {"steps": 12, "seed": 8, "num_images": 2, "scheduler": "dpm++"}
    with ThreadPoolExecutor(1) as pool:
        ordinary = pool.submit(server.client.predict_raw, "ddpm_step", {"steps": 20, "seed": 9, **BARE})
        events = list(server.client.stream("ddpm_step", {**payload, "preview_every": 4}))
        ordinary = ordinary.result(timeout=120)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(13)) and {e["total"] for e in progress} == {12}  # admission + each step
    previews = [e for e in events if e["event"] == "preview"]
    assert [e["step"] for e in previews] == [4, 8] and all(len(e["images"]) == 2 for e in previews)
    assert events[-1]["event"] == "result"
    assert_same(events[-1]["response"], server.client.predict("ddpm_static", payload))
    assert ordinary.status_code == 200 and ordinary.headers["content-type"] == "application/json"
    assert without_ids(ordinary.content) == without_ids(server.client.predict_raw("ddpm_static", {"steps": 20, "seed": 9, **BARE}).content)


def test_handler_time_is_logged_and_the_client_never_sends_a_customized_describe(server):
    """BaseHandler.handle is the entry point of the step-level path too: its HandlerTime metric
    (one time slice per call) reaches the server's metrics (/metrics: config.properties sets
    metrics_mode=prometheus; in log mode it is logs/model_metrics.log); a customized describe through the
    project's client comes back plain for the continuous-batching model, and the model serves on."""
    assert server.client.predict_raw("ddpm_step", {"steps": 4, "seed": 1}).status_code == 200
    (step,) = server.client.describe("ddpm_step", customized=True)
    assert step["continuousBatching"] is True and "customizedMetadata" not in step
    (static,) = server.client.describe("ddpm_static", customized=True)
    assert static["customizedMetadata"]["step_level_batching"] is False
    assert server.client.predict_raw("ddpm_step", {"steps": 4, "seed": 1}).status_code == 200
    handler_time = 'HandlerTime{ModelName="ddpm_step"'
    deadline = time.monotonic() + 60  # the frontend records backend metrics asynchronously
    while handler_time not in server.client.metrics() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert handler_time in server.client.metrics()
