"""The ddpm archive built by archive.sh, served by a real TorchServe the test starts itself."""
from __future__ import annotations

import base64
import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from clients import sample
from handlers.ddpm.request import DdpmRequest
from harness.bad_inputs import ddpm_cases
from harness.torchserve import TorchServeInstance
from harness.traffic import assert_bad_input_refused


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["ddpm.mar"], load_at_start=False) as ts:
        ts.client.register("ddpm.mar", batch_size=8, max_batch_delay=300)
        ts.client.wait_ready(["ddpm"], timeout=180)
        yield ts


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=int)


@pytest.mark.parametrize("case", ddpm_cases(), ids=lambda c: c[0])
def test_bad_input_gets_400_and_worker_survives(server, case):
    _, payload, field = case
    assert_bad_input_refused(server, "ddpm", payload, field)


def test_seeded_request_same_alone_and_batched(server):
    req = {"steps": 10, "seed": 2024, "num_images": 2}
    alone = server.client.predict("ddpm", req)
    others = [{"steps": 10, "seed": s} for s in range(7)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: server.client.predict_raw("ddpm", p), [req, *others]))
    assert [r.status_code for r in responses] == [200] * 8
    assert int(responses[0].headers["X-Batch-Size"]) > 1
    for a, b in zip(alone["images"], responses[0].json()["images"]):
        assert np.abs(decode(a) - decode(b)).max() <= 1


def test_an_id_in_flight_is_refused_by_every_worker(server):
    """While a streamed request runs on one worker (its first events have arrived, its result has
    not), a request with its id is refused 409 by whichever worker takes it; afterwards the id is
    free again, and every event of the stream carries it."""
    rid = f"served-{uuid.uuid4().hex[:12]}"
    events = server.client.stream("ddpm", {"steps": 1000, "seed": 1, "stream": True, "preview_every": 0,
                                           "request_id": rid})
    seen = [next(events), next(events)]  # admission (step 0), then step 1: running
    assert [e["step"] for e in seen] == [0, 1]
    twins = [server.client.predict_raw("ddpm", {"steps": 2, "seed": s, "request_id": rid}) for s in range(3)]
    seen += list(events)
    assert seen[-1]["event"] == "result" and seen[-1]["response"]["request_id"] == rid
    assert {e["request_id"] for e in seen} == {rid}
    assert [t.status_code for t in twins] == [409] * 3 and {t.json()["field"] for t in twins} == {"request_id"}
    again = server.client.predict_raw("ddpm", {"steps": 2, "seed": 1, "request_id": rid})
    assert again.status_code == 200 and again.json()["request_id"] == rid


def test_mixed_parameters_in_one_batch(server):
    payloads = [{"steps": 4, "seed": 1}, {"steps": 6, "scheduler": "ddpm", "seed": 2},
                {"steps": 5, "scheduler": "ddim", "eta": 0.5, "seed": 3}, {"steps": 4, "seed": 4, "num_images": 3},
                {"steps": 1001}]
    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(lambda p: server.client.predict_raw("ddpm", p), payloads))
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 400]
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    body = responses[3].json()
    assert len(body["images"]) == 3 and body["steps"] == 4
    assert body["scheduler"] == DdpmRequest.model_fields["scheduler"].default  # the declared default


def test_png_and_trajectory(server):
    raw = server.client.predict_raw("ddpm", {"steps": 3, "seed": 0}, accept="image/png")
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    traj = server.client.predict("ddpm", {"steps": 20, "seed": 0, "trajectory": True})
    gif = Image.open(io.BytesIO(base64.b64decode(traj["trajectory"])))
    assert gif.n_frames >= 5


def test_sample_client_saves_samples_grid_and_gif(server, tmp_path):
    args = ["-n", "3", "--steps", "4", "--seed", "5", "--trajectory", "--out", str(tmp_path),
            "--inference-url", server.url("inference"), "--management-url", server.url("management"),
            "--key-file", str(server.dir / "key_file.json")]
    assert sample.main(args) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["grid-5.png", "sample-5-0.png", "sample-5-1.png", "sample-5-2.png", "trajectory-5.gif"]
    served = server.client.predict("ddpm", {"num_images": 3, "steps": 4, "seed": 5})["images"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sample-5-2.png"), dtype=int), decode(served[2]))
    assert Image.open(tmp_path / "trajectory-5.gif").n_frames >= 4
