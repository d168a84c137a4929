"""(b) of `make test-arm64`: the contract's integration checks against a real TorchServe whose
workers are aarch64 processes, serving the three --target arm64 archives."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from deploy.targets import config_path, models
from harness.bad_inputs import cam_cases, ddpm_cases, sd15_cases
from harness.inprocess import png_bytes
from harness.traffic import assert_bad_input_refused, valid_payloads, without_ids
from weights import digits

BAD = [(model, case) for model, cases in (("cam", cam_cases()), ("ddpm", ddpm_cases()), ("sd15", sd15_cases()))
       for case in cases]


def test_workers_run_on_aarch64(runtimes):
    assert {m: r["machine"] for m, r in runtimes.items()} == {m: "aarch64" for m in models()}
    for model, runtime in runtimes.items():
        assert runtime["threads"] == yaml.safe_load(config_path(model, "arm64").read_text())["handler"]["threads"]


def test_cam_is_served_in_int8_with_maps(served):
    """arm64.yaml's int8 (qnnpack) is what the aarch64 worker runs, and its answers carry the map
    and the overlay (a worker that stayed float would say float32)."""
    handler = yaml.safe_load(config_path("cam", "arm64").read_text())["handler"]
    assert (handler["quantize"], handler["quantized_engine"]) == ("int8", "qnnpack")
    (desc,) = served.client.describe("cam", customized=True)
    assert desc["customizedMetadata"]["precision"] == "int8 (qnnpack)"
    answer = served.client.predict("cam", valid_payloads()["cam"])
    assert answer["cam"]["map"] and answer["cam"]["overlay"]


@pytest.mark.parametrize(("model", "case"), BAD, ids=lambda c: c[0] if isinstance(c, tuple) else c)
def test_bad_input_gets_400_with_field(served, model, case):
    _, payload, field = case
    assert_bad_input_refused(served, model, payload, field)


@pytest.mark.parametrize("model", models())
def test_token_auth_is_on(served, model):
    url = f"{served.url('inference')}/predictions/{model}"
    payload = valid_payloads()[model]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.post(url, headers=headers, timeout=60,
                             **({"data": payload} if isinstance(payload, bytes) else {"json": payload}))
        assert resp.status_code == 400 and "InvalidKeyException" in resp.text


@pytest.mark.parametrize("model", models())
def test_seeded_request_is_reproducible(served, model):
    payload = valid_payloads()[model]
    first, second = (served.client.predict_raw(model, payload) for _ in range(2))
    assert first.status_code == second.status_code == 200, first.text[:300]
    assert without_ids(first.json()) == without_ids(second.json())


def test_cam_concurrent_requests_are_batched_and_right(served):
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    pngs = [png_bytes(digits.to_pil(images[i], 64)) for i in test[:8]]
    with ThreadPoolExecutor(len(pngs)) as pool:
        responses = list(pool.map(lambda p: served.client.predict_raw("cam", p), pngs))
    assert [r.status_code for r in responses] == [200] * len(pngs)
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    correct = sum(r.json()["predictions"][0]["index"] == int(y) for r, y in zip(responses, labels[test[:8]]))
    assert correct >= 7
