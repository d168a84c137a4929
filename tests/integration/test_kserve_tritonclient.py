"""KServe v2 (Open Inference Protocol) with the client people use for it: Triton's
`tritonclient.http`, against a real KServe-mode TorchServe (harness/kserve.py, the `make kserve`
layout of the demo cpu archives).

tritonclient works at its defaults apart from one flag: JSON input tensors,
`InferInput.set_data_from_numpy(array, binary_data=False)`. Its default binary tensor framing is
refused with a 400 that says so; the `binary_data_output` parameter it sends is accepted (answers
are JSON tensors, which it reads as well). Each answer equals the model's /predictions answer for
the same fields, and 8 concurrent requests (sharing batches) give the images sequential ones give.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from deploy.kserve_layout import write_layout
from harness.kserve import KServeTorchServe
from harness.traffic import without_ids

TIMEOUT = 300


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


REQUESTS = {
    "cam": {"image": png_b64(), "topk": 3},
    "ddpm": {"steps": 2, "seed": 7, "scheduler": "ddim", "eta": 0.5},
    "sd15": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3},
}


def inputs(fields: dict, binary: bool = False) -> list:
    """One v2 input per field, as a tritonclient user writes them."""
    out = []
    for name, value in fields.items():
        if isinstance(value, str):
            array, datatype = np.array([value.encode()], dtype=np.object_), "BYTES"
        elif isinstance(value, float):
            array, datatype = np.array([value], dtype=np.float32), "FP32"
        else:
            array, datatype = np.array([value], dtype=np.int64), "INT64"
        inp = triton.InferInput(name, [1], datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        out.append(inp)
    return out


def fields_of(result) -> dict:
    """A tritonclient result -> the model's JSON answer (one-element tensors unwrapped, JSON-typed
    BYTES decoded): comparable with the /predictions answer."""
    answer = {}
    for t in result.get_response()["outputs"]:
        values = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy(t["name"]).tolist()]
        if (t.get("parameters") or {}).get("content_type") == "application/json":
            answer[t["name"]] = json.loads(values[0])
        else:
            answer[t["name"]] = values
    return answer


def as_tensors(answer: dict) -> dict:
    """A /predictions answer in the same shape as fields_of gives (scalars as one-element lists)."""
    return {k: v if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)
            else v if isinstance(v, (dict, list)) else [v] for k, v in answer.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    layout = write_layout("cpu", tmp_path_factory.mktemp("kserve-triton") / "cpu", "demo")
    with KServeTorchServe(layout, "v2", overrides={"ddpm": {"maxBatchDelay": 1500}}) as ts:
        yield ts


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8,
                                     connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    yield c
    c.close()


@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_answers_equal_predictions(server, client, model):
    fields = REQUESTS[model]
    result = client.infer(model, inputs(fields))
    rest = requests.post(f"{server.url}/predictions/{model}", json=fields, timeout=TIMEOUT)
    assert rest.status_code == 200, rest.text
    assert without_ids(fields_of(result)) == without_ids(as_tensors(rest.json()))
    assert result.get_response()["model_name"] == model


def test_sd15_loras_travel_as_the_json_text_of_the_list(client):
    """The one list field, sd15's `loras`: a BYTES input holding its JSON text is read as the list
    (the demo archive has no LoRA, so a name is unknown; a string that is no list says so)."""
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sd15", inputs({**REQUESTS["sd15"], "loras": json.dumps([{"name": "styled", "scale": 0.8}])}))
    assert exc.value.status() == "400" and exc.value.message().startswith("loras: unknown LoRA 'styled'")
    with pytest.raises(InferenceServerException) as exc:
        client.infer("sd15", inputs({**REQUESTS["sd15"], "loras": "styled"}))
    assert exc.value.status() == "400" and "must be a list of objects" in exc.value.message()


def test_requested_outputs_with_binary_flag_are_answered_as_json(client):
    """InferRequestedOutput's default asks for binary output data: the answer is JSON, which
    tritonclient reads the same way."""
    result = client.infer("ddpm", inputs(REQUESTS["ddpm"]), outputs=[triton.InferRequestedOutput("seed")])
    assert [t["name"] for t in result.get_response()["outputs"]] == ["seed"]
    assert result.as_numpy("seed").tolist() == [7]


def test_binary_tensors_are_refused_with_the_flag_to_use(client):
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ddpm", inputs(REQUESTS["ddpm"], binary=True))
    assert exc.value.status() == "400"
    assert "binary_data=False" in exc.value.message()


def test_bad_input_names_the_field(client):
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ddpm", inputs({"steps": 0}))
    assert exc.value.status() == "400" and exc.value.message().startswith("steps:")


def test_eight_concurrent_requests_give_the_sequential_images(client):
    bodies = [{"steps": 2, "seed": 40 + i, "num_images": 1 + i % 2} for i in range(8)]
    sequential = [fields_of(client.infer("ddpm", inputs(b)))["images"] for b in bodies]
    pending = [client.async_infer("ddpm", inputs(b)) for b in bodies]  # all 8 in flight at once
    concurrent = [fields_of(p.get_result(timeout=TIMEOUT))["images"] for p in pending]
    assert concurrent == sequential
    assert [len(images) for images in concurrent] == [1, 2] * 4
