"""handlers/kserve.py (v1 / v2 bodies per request, the envelope passthrough) and the KServe layout's
model_snapshot (harness/kserve.py), without a server (tests/integration/test_kserve_server.py
runs them in a real KServe-mode TorchServe)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from handlers.core import kserve
from handlers.core.errors import RequestError
from harness import kserve as layout
from harness.targets import config_path, models, targets


def test_v2_inputs_and_parameters_become_fields():
    body = {"id": "a", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
        {"name": "topk", "datatype": "INT32", "shape": [1, 1], "data": [[3]]},
        {"name": "scale", "datatype": "FP32", "shape": [1], "data": [7]},
    ], "parameters": {"method": "gradcam"}, "outputs": [{"name": "predictions"}]}
    fields, meta = kserve.unwrap_v2(body)
    assert fields == {"image": "aGk=", "topk": 3, "scale": 7.0, "method": "gradcam"}
    assert isinstance(fields["scale"], float)
    assert meta == {"id": "a", "outputs": ["predictions"]}


@pytest.mark.parametrize("body,field", [
    ({}, "inputs"),
    ({"inputs": []}, "inputs"),
    ({"inputs": [{"name": "steps", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}, "steps"),
    ({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [5]}]}, "prompt"),
    ({"inputs": [{"name": "steps", "datatype": "INT64", "shape": [1], "data": [1]}], "parameters": {"steps": 2}}, "steps"),
    ({"inputs": [{"datatype": "INT64", "shape": [1], "data": [1]}]}, "inputs[0]"),
])
def test_v2_errors_name_the_field(body, field):
    with pytest.raises(RequestError) as exc:
        kserve.unwrap_v2(body)
    assert exc.value.field == field


def test_v1_instances():
    assert kserve.unwrap_v1({"instances": ["aGk=", {"data": "aGk=", "topk": 1}, {"image": {"b64": "aGk="}}]}, "image", 8) == [
        {"image": "aGk="}, {"topk": 1, "image": "aGk="}, {"image": "aGk="}]
    assert kserve.unwrap_v1({"instances": [{"steps": 2}]}, None, None) == [{"steps": 2}]
    for body in ({}, {"instances": []}, {"instances": [{}] * 9}):
        with pytest.raises(RequestError) as exc:
            kserve.unwrap_v1(body, None, 8)
        assert exc.value.field == "instances"


def test_error_messages_name_where():
    err = RequestError("steps", "'steps' must be an integer")
    assert kserve._where("instances[1]", err) == "instances[1].steps: 'steps' must be an integer"
    assert kserve._where("", err) == "steps: 'steps' must be an integer"
    assert kserve._where("", RequestError("body", "empty")) == "empty"


def test_output_tensors():
    assert kserve.tensor("seed", 3) == {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]}
    assert kserve.tensor("images", ["a", "b"])["shape"] == [2]
    assert kserve.tensor("eta", 0.5)["datatype"] == "FP64"
    assert kserve.tensor("nsfw", [False])["datatype"] == "BOOL"
    assert kserve.tensor("warnings", []) == {"name": "warnings", "datatype": "BYTES", "shape": [0], "data": []}
    obj = kserve.tensor("cam", {"map": [[0.1]]})
    assert obj["parameters"] == {"content_type": "application/json"} and json.loads(obj["data"][0]) == {"map": [[0.1]]}
    mixed = kserve.tensor("images", ["a", None])  # a withheld sd15 image
    assert json.loads(mixed["data"][0]) == ["a", None]


def test_passthrough_only_for_kserve_native_handlers():
    from ts.torch_handler.request_envelope.kserve import KServeEnvelope
    from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

    assert kserve.install_passthrough()
    seen = {}

    class Native:
        kserve_native = True

        def handle(self, data, context):
            seen["data"], seen["protocol"] = data, self.kserve_protocol
            return ["a"] * len(data)

    batch = [{"body": {"instances": [1]}}, {"body": {"instances": [2]}}]
    for cls, protocol in ((KServeEnvelope, "kserve"), (KServev2Envelope, "kservev2")):
        assert cls(Native().handle).handle(batch, SimpleNamespace()) == ["a", "a"]
        assert seen == {"data": batch, "protocol": protocol}
    # any other handler keeps TorchServe's envelope: first request only, one response
    ctx = SimpleNamespace(get_request_header=lambda i, k: None)
    assert KServeEnvelope(lambda data, c: [x * 10 for x in data]).handle(batch, ctx) == [{"predictions": [10]}]


@pytest.mark.parametrize("target", targets())
def test_snapshot_carries_each_models_target_batch_settings(target):
    snap = layout.snapshot(target, models())
    assert snap["modelCount"] == len(models()) == len(snap["models"])
    for m in models():
        cfg = yaml.safe_load(config_path(m, target).read_text())
        entry = snap["models"][m]["1.0"]
        assert entry["marName"] == ("sd15" if m == "sd15" else f"{m}.mar")
        for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
            assert entry[key] == cfg[key], (m, target, key)
    props = layout.parse_properties(layout.render(layout.config_properties(target, models())))
    assert json.loads(props["model_snapshot"]) == snap


def test_layout_refuses_archives_of_another_target(tmp_path):
    import zipfile

    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(store / "ddpm.mar", "w") as z:
        z.writestr("archive.json", json.dumps({"profile": "demo", "target": "gpu", "version": "1.0"}))
    with pytest.raises(ValueError, match="built for target 'gpu'"):
        layout.write_layout("cpu", tmp_path / "out", "demo", store=store, names=["ddpm"])
    out = layout.write_layout("gpu", tmp_path / "out", "demo", store=store, names=["ddpm"])
    assert sorted(p.name for p in (out / "model-store").iterdir()) == ["ddpm.mar"]
    assert (out / "config" / "config.properties").is_file()
