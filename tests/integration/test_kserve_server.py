"""KServe v1 and v2 (Open Inference Protocol) against a real TorchServe started exactly as KServe's
runtime starts it (harness/kserve.py): `torchserve --start --model-store=<layout>/model-store
--ts-config=<layout>/config/config.properties` with TS_SERVICE_ENVELOPE=kserve|kservev2, from the
storage layout `make kserve` writes (here: into a temp dir, from the demo cpu archives). Only the
port numbers and, for ddpm, maxBatchDelay (so that 4 concurrent requests surely share a batch)
differ from the layout's config."""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from deploy.kserve_layout import write_layout
from harness.kserve import KServeTorchServe

TIMEOUT = 300


def png_b64(color=(200, 30, 30), size=(24, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def v2_input(name, value):
    datatype = "BYTES" if isinstance(value, str) else "BOOL" if isinstance(value, bool) else \
        "INT64" if isinstance(value, int) else "FP32"
    return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}


def v2_body(**fields):
    return {"inputs": [v2_input(k, v) for k, v in fields.items()]}


def outputs(body: dict) -> dict:
    """v2 outputs by name, JSON-typed BYTES decoded."""
    out = {}
    for t in body["outputs"]:
        assert set(t) >= {"name", "datatype", "shape", "data"}
        assert len(t["data"]) == t["shape"][0]
        if (t.get("parameters") or {}).get("content_type") == "application/json":
            out[t["name"]] = json.loads(t["data"][0])
        else:
            out[t["name"]] = t["data"]
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return write_layout("cpu", tmp_path_factory.mktemp("kserve") / "cpu", "demo")


@pytest.fixture(scope="module", params=["v1", "v2"])
def ts(request, layout):
    with KServeTorchServe(layout, request.param, overrides={"ddpm": {"maxBatchDelay": 1500}}) as server:
        yield server


def call(ts, model, body, explain=False):
    if ts.protocol == "v1":
        url = f"{ts.url}/v1/models/{model}:{'explain' if explain else 'predict'}"
    else:
        url = f"{ts.url}/v2/models/{model}/infer"
    return requests.post(url, json=body, timeout=TIMEOUT)


def test_cam(ts):
    img = png_b64()
    if ts.protocol == "v1":
        r = call(ts, "cam", {"instances": [img, {"image": {"b64": img}, "topk": 2}, {"data": img, "topk": 1}]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [len(p["predictions"]) for p in preds] == [5, 2, 1]
        assert preds[0]["predictions"][0] == preds[1]["predictions"][0]
        r = call(ts, "cam", {"instances": [img]}, explain=True)
        assert r.status_code == 200, r.text
        assert set(r.json()["explanations"][0]) >= {"target", "label", "map"}
    else:
        body = {"id": "req-1", **v2_body(image=img, topk=3)}
        r = call(ts, "cam", body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["id"], doc["model_name"], doc["model_version"]) == ("req-1", "cam", "1.0")
        out = outputs(doc)
        assert len(out["predictions"]) == 3 and "overlay" in out["cam"]
        # requested outputs only; a request-level parameter is a field too
        r = call(ts, "cam", {**v2_body(image=img), "parameters": {"topk": 1}, "outputs": [{"name": "predictions"}]})
        assert r.status_code == 200, r.text
        assert [t["name"] for t in r.json()["outputs"]] == ["predictions"]
        assert len(outputs(r.json())["predictions"]) == 1


def test_ddpm(ts):
    if ts.protocol == "v1":
        r = call(ts, "ddpm", {"instances": [{"steps": 2, "seed": 1}, {"steps": 2, "seed": 2, "num_images": 2}]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [len(p["images"]) for p in preds] == [1, 2] and [p["seed"] for p in preds] == [1, 2]
    else:
        r = call(ts, "ddpm", v2_body(steps=2, seed=7, scheduler="ddim", eta=0.5))
        assert r.status_code == 200, r.text
        out = outputs(r.json())
        assert out["seed"] == [7] and out["scheduler"] == ["ddim"] and out["eta"] == [0.5]
        Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).verify()


def test_sd15(ts):
    fields = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
    if ts.protocol == "v1":
        r = call(ts, "sd15", {"instances": [fields]})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
    else:
        r = call(ts, "sd15", v2_body(**fields))
        assert r.status_code == 200, r.text
        pred = {k: (v if k in ("images", "warnings", "nsfw") else v[0]) for k, v in outputs(r.json()).items()}
    assert pred["seed"] == 3 and pred["width"] == 64 and len(pred["images"]) == 1


@pytest.mark.parametrize("model,fields,field", [
    ("cam", {"image": "bm90IGFuIGltYWdl", "topk": 1}, "image"),
    ("ddpm", {"steps": 0}, "steps"),
    ("sd15", {"prompt": "x", "steps": 2, "width": 65, "height": 64}, "width"),
    ("ddpm", {"steps": 2, "colour": "red"}, "colour"),
])
def test_bad_input_names_the_field(ts, model, fields, field):
    body = {"instances": [fields]} if ts.protocol == "v1" else v2_body(**fields)
    r = call(ts, model, body)
    assert r.status_code == 400, r.text
    doc = r.json()
    assert list(doc) == ["error"]  # the protocol's error shape
    where = f"instances[0].{field}" if ts.protocol == "v1" else field
    assert doc["error"].startswith(where + ":"), doc


def test_malformed_envelope(ts):
    wrong = {"inputs": []} if ts.protocol == "v1" else {"instances": [{"steps": 2}]}
    r = call(ts, "ddpm", wrong)
    assert r.status_code == 400 and list(r.json()) == ["error"]
    assert r.json()["error"].startswith("instances:" if ts.protocol == "v1" else "inputs:")
    if ts.protocol == "v2":
        r = call(ts, "ddpm", {"inputs": [{"name": "steps", "datatype": "INT64", "shape": [2], "data": [2, 3]}]})
        assert r.status_code == 400 and r.json()["error"].startswith("steps:")


def test_concurrent_requests_share_a_batch_and_each_gets_its_answer(ts):
    """The stock envelopes read only request 0 of a batch (see test_stock_envelope_...); here 4
    requests arrive within ddpm's (raised) maxBatchDelay: all are answered, each with its own
    seed, and one bad request fails alone."""
    def one(i):
        fields = {"steps": 2, "seed": 100 + i} if i != 3 else {"steps": -1}
        return call(ts, "ddpm", {"instances": [fields]} if ts.protocol == "v1" else v2_body(**fields))

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(4)))
    assert [a.status_code for a in answers] == [200, 200, 200, 400], [a.text[:200] for a in answers]
    seeds = [a.json()["predictions"][0]["seed"] if ts.protocol == "v1" else outputs(a.json())["seed"][0]
             for a in answers[:3]]
    assert seeds == [100, 101, 102]
    assert max(int(a.headers["X-Batch-Size"]) for a in answers) >= 2  # they did share a batch


def test_stock_envelope_fails_a_whole_batch(tmp_path):
    """What TorchServe's own kserve envelope does with a batch of 2+ (KSERVE_STOCK_ENVELOPE=1
    turns handlers/kserve.py's passthrough off): every request of it gets 503 "number of batch
    response mismatched" (ts/service.py), none is silently dropped."""
    layout = write_layout("cpu", tmp_path / "cpu", "demo", names=["ddpm"])
    with KServeTorchServe(layout, "v1", overrides={"ddpm": {"maxBatchDelay": 1500, "minWorkers": 1, "maxWorkers": 1}},
                          env={"KSERVE_STOCK_ENVELOPE": "1"}) as server:
        def one(i):
            return call(server, "ddpm", {"instances": [{"steps": 2, "seed": i}]})

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(one, range(3)))
    assert [a.status_code for a in answers] == [503] * 3
    assert all("number of batch response mismatched" in a.text for a in answers)


def test_describe_works_under_the_envelope(ts):
    """KServe's wrapper can wait for `customizedMetadata` (MODEL_LOAD_CUSTOMIZED=true); the
    describe call goes through the envelope too."""
    r = requests.get(f"{ts.management}/models/cam?customized=true", timeout=60)
    assert r.status_code == 200, r.text
    meta = r.json()[0]["customizedMetadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta["target"] == "cpu" and "image" in meta["request_schema"]["properties"]
