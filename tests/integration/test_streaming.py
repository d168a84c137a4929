"""Streaming (`"stream": true`, NDJSON events) against a real TorchServe.

Two servers: the shipped ddpm and sd15 archives (events, previews, a batch mixing streaming and
ordinary requests), and a ddpm archive built by archive.sh around a test double whose UNet sleeps
`slow_unet_s` per call, with responseTimeout 2 s (per-step limits, a request outlasting
responseTimeout, a client that disconnects, a worker killed mid-stream). The only clock readings
are lower bounds the sleeps guarantee (events spread over time, a request longer than
responseTimeout): a slower or busier machine only makes them truer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from clients.api import ServerError
from handlers.adapter.torchserve import TS_STREAM_NEXT
from harness import REPO
from harness.torchserve import TorchServeInstance
from harness.traffic import wait_replaced, without_ids, worker_pids

SLOW_UNET_S = 0.25
RESPONSE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["ddpm.mar", "sd15"], load_at_start=False) as ts:
        # Up to 4 requests per batch, gathered for up to 3 s: a test sending 4 at once gets ONE batch.
        for archive in ("ddpm.mar", "sd15"):
            ts.client.register(archive, batch_size=4, max_batch_delay=3000)
        ts.client.wait_ready(["ddpm", "sd15"], timeout=300)
        yield ts


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """ddpm with a UNet that sleeps 0.25 s per call, responseTimeout 2 s, one worker."""
    configs = tmp_path_factory.mktemp("slow-configs")
    cfg = yaml.safe_load((REPO / "model_configs/ddpm/cpu.yaml").read_text())
    cfg.update(minWorkers=1, maxWorkers=1, batchSize=2, maxBatchDelay=1500, responseTimeout=RESPONSE_TIMEOUT_S)
    cfg["handler"].update(slow_unet_s=SLOW_UNET_S, torchscript=False)
    (configs / "ddpm").mkdir()
    (configs / "ddpm" / "slow.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path_factory.mktemp("slow-store")
    subprocess.run([str(REPO / "archive.sh"), "--target", "slow", "--store", str(store), "--name", "ddpm_slow",
                    "--handler", str(REPO / "tests/support/slow_ddpm.py"), "ddpm"],
                   check=True, capture_output=True, env={**os.environ, "MODEL_CONFIGS": str(configs)})
    with TorchServeInstance(archives=["ddpm_slow.mar"], source_store=store) as ts:
        yield ts


def post_stream(ts, model: str, payload: dict, timeout: float = 60) -> requests.Response:
    return requests.post(f"{ts.url('inference')}/predictions/{model}", json=payload, stream=True, timeout=timeout,
                         headers={"Authorization": f"Bearer {ts.client.keys.inference}"})


def timed_events(resp: requests.Response) -> list[tuple[float, dict]]:
    """(arrival time, event) for each NDJSON line, read as the chunks arrive."""
    return [(time.monotonic(), json.loads(line)) for line in resp.iter_lines(chunk_size=None) if line]


def test_events_arrive_step_by_step(slow):
    steps = 8
    started = time.monotonic()
    resp = post_stream(slow, "ddpm_slow", {"stream": True, "steps": steps, "seed": 3, "preview_every": 3})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    events = timed_events(resp)
    kinds = [e["event"] for _, e in events]
    assert kinds == ["progress"] * 4 + ["preview"] + ["progress"] * 3 + ["preview"] + ["progress"] * 2 + ["result"]
    progress = [e for _, e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(steps + 1)) and {e["total"] for e in progress} == {steps}
    assert all(e["elapsed_s"] >= 0 for e in progress) and progress[-1]["eta_s"] == 0
    assert [e["step"] for _, e in events if e["event"] == "preview"] == [3, 6]
    # Spread over time, not all at the end: each UNet call sleeps 0.25 s, so step k's event
    # cannot arrive before k x 0.25 s, and the result arrives at least 7 x 0.25 s after step 1's.
    arrivals = {e["step"]: t for t, e in events if e["event"] == "progress"}
    assert events[-1][0] - arrivals[1] >= (steps - 1) * SLOW_UNET_S
    assert all(arrivals[k] - started >= k * SLOW_UNET_S for k in arrivals)
    result = events[-1][1]["response"]
    assert result["steps"] == steps and result["seed"] == 3 and len(result["images"]) == 1


def test_streaming_request_outlasts_response_timeout(slow):
    """16 steps x 0.25 s = 4 s, twice responseTimeout: streamed, it completes (TorchServe's timer
    restarts at every message) and the worker is not restarted. Not streamed, the worker's own
    measured speed says it cannot finish in time: 400 naming the field, and how to stream it."""
    pids = worker_pids(slow.client, "ddpm_slow")
    refused = slow.client.predict_raw("ddpm_slow", {"steps": 16, "seed": 1})
    assert refused.status_code == 400
    assert refused.json()["field"] == "steps" and "stream" in refused.json()["error"]
    started = time.monotonic()
    events = list(slow.client.stream("ddpm_slow", {"steps": 16, "seed": 1}))
    assert time.monotonic() - started > RESPONSE_TIMEOUT_S
    assert events[-1]["event"] == "result" and len(events[-1]["response"]["images"]) == 1
    short = slow.client.predict_raw("ddpm_slow", {"steps": 4, "seed": 1})  # 1 s: inside the budget
    assert short.status_code == 200
    assert worker_pids(slow.client, "ddpm_slow") == pids
    assert "Worker died" not in slow.model_log() and "timed out" not in slow.output(100_000).lower()


def test_client_disconnect_breaks_nothing(slow):
    """A streaming client goes away after two events; the ordinary request batched with it is
    answered, the worker lives on and serves the next stream."""
    pids = worker_pids(slow.client, "ddpm_slow")
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(slow.client.predict_raw, "ddpm_slow", {"steps": 4, "seed": 5})
        resp = post_stream(slow, "ddpm_slow", {"stream": True, "steps": 12, "seed": 4})
        lines = resp.iter_lines(chunk_size=None)
        first = [json.loads(next(lines)) for _ in range(2)]
        resp.close()
        answered = other.result(timeout=60)
    assert [e["event"] for e in first] == ["progress", "progress"]
    assert answered.status_code == 200 and int(answered.headers["X-Batch-Size"]) == 2
    events = list(slow.client.stream("ddpm_slow", {"steps": 4, "seed": 6}))
    assert events[-1]["event"] == "result"
    assert worker_pids(slow.client, "ddpm_slow") == pids


def test_worker_killed_mid_stream_ends_the_stream(slow):
    """SIGKILL the worker after two events: the client's stream ends with an error (an error event
    or a cut connection, ServerError either way) well before the client's own timeout; TorchServe
    starts a new worker that serves again."""
    (victim,) = worker_pids(slow.client, "ddpm_slow")
    client = slow.make_client(timeout=60, retries=0)
    events = client.stream("ddpm_slow", {"steps": 40, "seed": 7})
    first = [next(events), next(events)]
    assert [e["event"] for e in first] == ["progress", "progress"]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(ServerError) as ended:
        for _ in events:
            pass
    print("stream ended with:", ended.value)
    # Ended by the server (an error event, or the connection cut), not by the client's read timeout.
    cause = ended.value.__cause__
    assert not isinstance(cause, requests.Timeout) and "timed out" not in str(cause).lower(), cause
    assert wait_replaced(slow.client, "ddpm_slow", victim, timeout=120)
    assert slow.client.predict_raw("ddpm_slow", {"steps": 2, "seed": 1}).status_code == 200


@pytest.mark.parametrize("model, payloads", [
    ("ddpm", [{"steps": 6, "seed": s, "num_images": 1 + s % 2} for s in range(4)]),
    ("sd15", [{"prompt": p, "steps": 4, "seed": s} for s, p in enumerate(["a red 7", "a blue 2", "a red 7", "a white 0"])]),
])
def test_mixed_batch_of_streaming_and_ordinary_requests(server, model, payloads):
    """4 requests in ONE batch, 2 streaming and 2 not, against the same 4 all ordinary: the
    ordinary ones get the same bytes (body and content type, no chunked stream), the streaming ones
    end with exactly the ordinary response to the same request (the same seeded images)."""
    def send(payload: dict, stream: bool):
        if not stream:
            resp = server.client.predict_raw(model, payload)
            return resp, resp.content
        resp = post_stream(server, model, {**payload, "stream": True, "preview_every": 2})
        return resp, [e for _, e in timed_events(resp)]

    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda p: send(p, False), payloads))
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda ps: send(*ps), zip(payloads, [True, False, True, False])))
    assert [int(r.headers["X-Batch-Size"]) for r, _ in plain + mixed] == [4] * 8
    for (p_resp, p_body), (m_resp, m_body), streamed in zip(plain, mixed, [True, False, True, False]):
        assert p_resp.status_code == m_resp.status_code == 200
        if streamed:
            assert m_resp.headers["content-type"] == "application/x-ndjson"
            assert m_body[0]["event"] == "progress" and m_body[0]["step"] == 0
            assert any(e["event"] == "preview" for e in m_body)
            assert without_ids(m_body[-1]) == {"event": "result", "response": without_ids(p_body)}
        else:
            assert without_ids(m_body) == without_ids(p_body)
            assert m_resp.headers["content-type"] == p_resp.headers["content-type"] == "application/json"
            assert TS_STREAM_NEXT not in m_resp.headers and m_resp.headers.get("transfer-encoding") != "chunked"


def test_sd15_progress_counts_the_steps_diffusers_runs(server):
    """PNDM runs one step more than asked; img2img runs int(steps x strength): the events count
    what really runs, and the VAE previews are full-size images."""
    import base64
    import io

    from PIL import Image
    events = list(server.client.stream("sd15", {"prompt": "a red 7", "steps": 6, "seed": 1, "scheduler": "pndm",
                                                "preview_every": 3, "preview_vae": True}))
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(8)) and progress[-1]["total"] == 7
    preview = next(e for e in events if e["event"] == "preview")
    final = events[-1]["response"]
    size = Image.open(io.BytesIO(base64.b64decode(preview["images"][0]))).size
    assert size == (final["width"], final["height"])
