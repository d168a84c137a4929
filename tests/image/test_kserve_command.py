"""The image run with the plain Kubernetes Deployment's command line and environment
(deploy/k8s/torchserve.yaml; the KServe runtime's is the same command): the entrypoint runs a
`torchserve ...` command as given, with the layout baked at /mnt/models (token off there)."""
from __future__ import annotations

import os

import pytest
import yaml

from harness import REPO, image
from harness.bad_inputs import good_png

IMAGE = os.environ.get("TS_IMAGE", "")


@pytest.fixture(scope="module")
def deployment():
    docs = yaml.safe_load_all((REPO / "deploy" / "k8s" / "torchserve.yaml").read_text())
    (dep,) = [d for d in docs if d and d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    c = image.Container(IMAGE, "ts-image-test-k8s", command=spec["args"],
                        env={e["name"]: e["value"] for e in spec.get("env", [])}, container_port=ports["inference"])
    c.run()
    try:
        c.wait_ready(3)
        yield c
    finally:
        c.remove()


def test_deployment_command_serves_the_baked_layout(deployment):
    assert set(deployment.workers()) == {"cam", "ddpm", "sd15"}
    client = deployment.client()
    assert client.keys.inference is None  # the layout's config: token authorization off
    assert client.predict("cam", good_png())["predictions"]
