"""Two versions of cam in one TorchServe: registered through the management API, listed,
addressed by /predictions/cam/<version>, the default switched; the compare client's figures
checked against the test's own count."""
from __future__ import annotations

import json
import subprocess

import pytest

from clients.api import ServerError
from harness import REPO
from harness.inprocess import demo_weights
from harness.torchserve import TorchServeInstance
from lab import compare, finetune_cam
from tests.support.shifted import tiny_folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    data = tiny_folder(root / "data", per_class=3)
    # A few steps only: enough to change the answers, not to learn the shift.
    finetune_cam.finetune(data, demo_weights("cam"), root / "ft", epochs=1, batch_size=8, threads=1)
    store = root / "store"
    subprocess.run([str(REPO / "archive.sh"), "--store", str(store), "--weights", str(root / "ft"),
                    "--version", "2.0", "cam"], check=True, capture_output=True)
    assert (store / "cam-2.0.mar").is_file() and not (store / "cam.mar").exists()
    (store / "cam.mar").symlink_to(REPO / "model_store" / "cam.mar")
    with TorchServeInstance(archives=["cam.mar", "cam-2.0.mar"], source_store=store, load_at_start=False) as ts:
        for archive in ("cam.mar", "cam-2.0.mar"):
            ts.client.register(archive, batch_size=8, max_batch_delay=20, initial_workers=1)
        ts.data = data
        ts.items = compare.labelled_images(data)
        yield ts


def top1(server, path, version=None) -> dict:
    return server.client.predict("cam", path.read_bytes(), version=version)["predictions"][0]


def test_both_versions_listed_and_default_switches(server):
    assert compare.registered_versions(server.client) == ["1.0", "2.0"]
    path = server.items[0][0]
    for version in ("2.0", "1.0"):
        server.client.set_default("cam", version)
        assert server.client.describe("cam")[0]["modelVersion"] == version
        assert top1(server, path) == top1(server, path, version)  # /predictions/cam -> the default


def test_versions_answer_differently_on_shifted_images(server):
    answers = {v: [top1(server, p, v)["label"] for p, _ in server.items] for v in ("1.0", "2.0")}
    differ = [i for i, (a, b) in enumerate(zip(answers["1.0"], answers["2.0"])) if a != b]
    assert differ, answers
    full = server.client.predict("cam", server.items[differ[0]][0].read_bytes(), version="2.0")
    assert len(full["cam"]["map"]) == 4 and full["cam"]["overlay"]  # CAM still works on 2.0
    with pytest.raises(ServerError) as err:
        top1(server, server.items[0][0], "3.0")
    assert err.value.status == 404


def test_compare_client_matches_a_hand_count(server, tmp_path):
    out, page = tmp_path / "compare.json", tmp_path / "compare.html"
    code = compare.main([str(server.data), "--out", str(out), "--html", str(page),
                         "--inference-url", server.url("inference"), "--management-url", server.url("management"),
                         "--key-file", str(server.dir / "key_file.json")])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["versions"]) == ["1.0", "2.0"] and result["images"] == len(server.items) == 30
    answers = {}
    for version in ("1.0", "2.0"):
        answers[version] = [top1(server, path, version)["label"] for path, _ in server.items]
        hits = [a == label for a, (_, label) in zip(answers[version], server.items)]
        figures = result["versions"][version]
        assert figures["correct"] == sum(hits)
        assert figures["accuracy"] == pytest.approx(sum(hits) / 30)
        assert figures["per_class"]["4"] == pytest.approx(sum(hits[12:15]) / 3)  # sorted: 3 images per digit
    disagree = [str(p) for i, (p, _) in enumerate(server.items) if answers["1.0"][i] != answers["2.0"][i]]
    assert [d["image"] for d in result["disagreements"]] == disagree
    assert page.read_text().count("data:image/jpeg;base64,") == 2 * len(disagree)  # both versions' CAMs
    with pytest.raises(compare.CompareError, match="no version 3.0"):
        compare.compare(server.client, server.items, ["1.0", "3.0"])
