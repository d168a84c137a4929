"""handlers/core/kserve.py (v1 / v2 bodies per request), the adapter's routes and envelope pass-through, and the KServe layout's
model_snapshot (deploy/kserve_layout.py), without a server (tests/integration/test_kserve_server.py
runs them in a real KServe-mode TorchServe)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from deploy import kserve_layout as layout
from deploy.targets import config_path, models, targets
from handlers.core import kserve
from handlers.core.errors import RequestError
from harness.traffic import without_ids


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


def test_v2_reserved_parameters_are_accepted_and_ignored():
    """What tritonclient and KServe send at their defaults (binary_data_output, ...) is not a
    model field."""
    inputs = [{"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}]
    reserved = {name: True for name in kserve.RESERVED_PARAMETERS}
    fields, _ = kserve.unwrap_v2({"inputs": inputs, "parameters": {**reserved, "seed": 4}})
    assert fields == {"steps": 2, "seed": 4}


def test_v2_binary_tensors_are_refused_with_how_to_send_json(ddpm_handler):
    """A body in the binary tensor extension's framing (tritonclient's default) gets a 400 that
    names the JSON flag, not 'body is not valid JSON'; the JSON request of the same batch is
    answered."""
    handler, ctx = ddpm_handler
    header = json.dumps({"inputs": [{"name": "steps", "datatype": "INT64", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    v2 = {"inputs": [{"name": "steps", "datatype": "INT64", "shape": [1], "data": [2]}],
          "parameters": {"binary_data_output": True}}
    ctx.new_batch([{"Inference-Header-Content-Length": str(len(header))}, {"Content-Type": "application/json"}],
                  route="kserve")
    binary, ok = handler.handle([{"body": header + (2).to_bytes(8, "little")}, {"body": v2}], ctx)
    assert ctx.status(0) == 400 and "binary_data=False" in json.loads(binary)["error"]
    assert ctx.status(1) == 200 and [t["name"] for t in json.loads(ok)["outputs"]][:1] == ["images"]


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
    assert kserve.where("instances[1]", err) == "instances[1].steps: 'steps' must be an integer"
    assert kserve.where("", err) == "steps: 'steps' must be an integer"
    assert kserve.where("", RequestError("body", "empty")) == "empty"


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


def test_envelope_passes_through_only_when_set_and_only_to_this_projects_handlers(monkeypatch):
    from ts.torch_handler.request_envelope.kserve import KServeEnvelope
    from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope

    from handlers.adapter import envelope
    from handlers.adapter.torchserve import TorchServeHandler

    stock = {cls: (cls.parse_input, cls.format_output) for cls in (KServeEnvelope, KServev2Envelope)}
    monkeypatch.delenv("TS_SERVICE_ENVELOPE", raising=False)
    envelope.pass_through(TorchServeHandler)  # nothing set: nothing patched
    assert {cls: (cls.parse_input, cls.format_output) for cls in stock} == stock and envelope.active() is None

    class Native(TorchServeHandler):
        def handle(self, data, context):
            return ["a"] * len(data)

    batch = [{"body": {"instances": [1]}}, {"body": {"instances": [2]}}]
    try:
        for cls, name in ((KServeEnvelope, "kserve"), (KServev2Envelope, "kservev2")):
            monkeypatch.setenv("TS_SERVICE_ENVELOPE", name)
            bound = cls(Native().handle).handle  # TorchServe binds the envelope before initialize
            envelope.pass_through(TorchServeHandler)
            assert envelope.active() == name
            assert bound(batch, SimpleNamespace()) == ["a", "a"]
        # any other handler keeps TorchServe's envelope: first request only, one response
        ctx = SimpleNamespace(get_request_header=lambda i, k: None)
        assert KServeEnvelope(lambda data, c: [x * 10 for x in data]).handle(batch, ctx) == [{"predictions": [10]}]
    finally:
        for cls, (parse, fmt) in stock.items():
            cls.parse_input, cls.format_output = parse, fmt


def test_routes_are_told_apart_per_request(ddpm_handler):
    """One batch with a /predictions request, a KServe v1 and a v2 request (no url_path header,
    no envelope) and the same in a gRPC batch (no headers at all: answered like /predictions)."""
    from harness.context import run_batch

    handler, ctx = ddpm_handler
    fields = {"steps": 2, "seed": 3}
    v2 = {"inputs": [{"name": k, "datatype": "INT64", "shape": [1], "data": [v]} for k, v in fields.items()]}
    ctx.new_batch([{}, {"Content-Type": "application/json"}, {"Content-Type": "application/json"}],
                  route=["predictions", "kserve", "kserve"])
    rest, v1_out, v2_out = handler.handle([{"body": fields}, {"body": {"instances": [fields, fields]}},
                                           {"body": v2}], ctx)
    rest = json.loads(rest)
    assert [ctx.status(i) for i in range(3)] == [200, 200, 200]
    assert without_ids(json.loads(v1_out)["predictions"]) == without_ids([rest, rest])
    outputs = {t["name"]: t["data"] for t in json.loads(v2_out)["outputs"]}
    assert outputs["images"] == rest["images"] and outputs["seed"] == [3]
    (grpc,) = run_batch(handler, ctx, [{"body": fields}], route="grpc")
    assert without_ids(grpc) == without_ids(rest)


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
