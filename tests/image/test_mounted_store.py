"""The image serving a model store mounted from the host over the baked one
(`podman run -v STORE:/mnt/models/model-store:ro`): what the store holds is what is served."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from harness import REPO, image
from harness.bad_inputs import good_png

IMAGE = os.environ.get("TS_IMAGE", "")


@pytest.fixture(scope="module")
def mounted():
    store = Path(tempfile.mkdtemp(prefix="ts-image-store-"))
    store.chmod(0o755)  # read by the container's uid 1000
    src = REPO / "model_store" / "cam.mar"
    assert src.exists(), f"{src} missing: run make archive"
    try:
        os.link(src, store / "cam.mar")
    except OSError:
        shutil.copy2(src, store / "cam.mar")
    c = image.Container(IMAGE, "ts-image-test-mounted", store=store)
    c.run()
    try:
        c.wait_ready(1)
        yield c
    finally:
        c.remove()
        shutil.rmtree(store, ignore_errors=True)


def test_mounted_store_is_what_is_served(mounted):
    assert set(mounted.workers()) == {"cam"}
    client = mounted.client()
    assert client.predict("cam", good_png())["predictions"]
    assert client.predict_raw("ddpm", {"num_images": 1, "steps": 2}).status_code == 404
