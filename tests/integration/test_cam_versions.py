"""Two versions of cam in one TorchServe: registered through the management API, addressed by
/predictions/cam/<version>, default switched; the compare client counted against the test's own."""
from __future__ import annotations

import subprocess

import pytest
from PIL import Image

from clients.compare import compare, labelled_images
from tests.conftest import demo_weights, png_bytes
from tests.support.torchserve import REPO, TorchServeInstance
from tests.support.shifted import tiny_folder
from weights import finetune_cam


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    data = tiny_folder(root / "data", per_class=2)
    finetune_cam.finetune(data, demo_weights("cam"), root / "ft", epochs=1, max_steps=3, batch_size=8, threads=1)
    store = root / "store"
    subprocess.run([str(REPO / "archive.sh"), "--store", str(store), "--weights", str(root / "ft"),
                    "--version", "2.0", "cam"], check=True)
    (store / "cam.mar").symlink_to(REPO / "model_store" / "cam.mar")
    with TorchServeInstance(archives=["cam.mar", "cam-2.0.mar"], source_store=store, load_at_start=False) as ts:
        for archive in ("cam.mar", "cam-2.0.mar"):
            ts.client.register(archive, initial_workers=1)
        ts.data = data
        yield ts


def test_both_versions_listed_and_default_switches(server):
    versions = sorted(d["modelVersion"] for d in server.client.describe("cam", "all"))
    assert versions == ["1.0", "2.0"]
    server.client.set_default("cam", "2.0")
    default = server.client.describe("cam")[0]
    assert default["modelVersion"] == "2.0"
    server.client.set_default("cam", "1.0")
    assert server.client.describe("cam")[0]["modelVersion"] == "1.0"


def test_versions_answer_differently(server):
    image = png_bytes(Image.open(next((server.data / "4").iterdir())))
    v1 = server.client.predict("cam", image, version="1.0")
    v2 = server.client.predict("cam", image, version="2.0")
    assert [p["probability"] for p in v1["predictions"]] != [p["probability"] for p in v2["predictions"]]
    assert v2["cam"]["map"]  # CAM still works on the fine-tuned version


def test_compare_client_matches_a_hand_count(server):
    items = labelled_images(server.data)
    result = compare(server.client, items, ["1.0", "2.0"])
    for version in ("1.0", "2.0"):
        by_hand = sum(server.client.predict("cam", path.read_bytes(), version=version)["predictions"][0]["label"]
                      == label for path, label in items)
        assert result["versions"][version]["correct"] == by_hand
        assert result["versions"][version]["accuracy"] == pytest.approx(by_hand / len(items))
    assert len(result["disagreements"]) <= len(items)
