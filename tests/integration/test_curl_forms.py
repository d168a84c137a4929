"""Which `curl` command lines deliver a raw image to cam (handlers/cam/README.md).

The real curl binary against a real TorchServe serving cam.mar, with the instance's inference
key. Three forms reach the handler and get a prediction; `--data-binary` without a Content-Type
is sent by curl as application/x-www-form-urlencoded and TorchServe's frontend fails to decode
it (500, before any handler runs).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from harness.inprocess import png_bytes
from harness.torchserve import TorchServeInstance
from weights import digits


@pytest.fixture(scope="module")
def curl():
    path = shutil.which("curl")
    assert path, "the curl binary is required (apt-get install -y curl; .ci/run installs it)"
    return path


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    images, labels = digits.load_arrays()
    _, test = digits.split_indices()
    i = int(test[0])
    path = tmp_path_factory.mktemp("curl") / "digit.png"
    path.write_bytes(png_bytes(digits.to_pil(images[i], 64)))
    return path, int(labels[i])


def run_curl(curl, server, digit_path, *form):
    key = json.loads((server.dir / "key_file.json").read_text())["inference"]["key"]
    url = f"{server.url('inference')}/predictions/cam"
    r = subprocess.run(
        [curl, "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {key}",
         *form, url],
        cwd=digit_path.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.rpartition("\n")
    return int(status), body


WORKING = {
    "upload-file": ["-T", "digit.png"],
    "form-field-data": ["-F", "data=@digit.png"],
    "octet-stream": ["-H", "Content-Type: application/octet-stream", "--data-binary", "@digit.png"],
}


@pytest.mark.parametrize("form", WORKING.values(), ids=WORKING.keys())
def test_form_gets_a_prediction(curl, server, digit, form):
    path, label = digit
    status, body = run_curl(curl, server, path, *form)
    assert status == 200, body
    result = json.loads(body)
    assert result["predictions"][0]["index"] == label, result["predictions"]
    assert result["cam"]["target"] == label


def test_data_binary_without_content_type_fails_in_the_frontend(curl, server, digit):
    path, _ = digit
    status, body = run_curl(curl, server, path, "--data-binary", "@digit.png")
    assert status == 500, body
    assert "ErrorDataDecoderException" in body, body  # Netty's form decoder, not the handler
    # The same bytes with a Content-Type other than a form are fine (see WORKING).
    status, body = run_curl(curl, server, path, "-H", "Content-Type: image/png",
                            "--data-binary", "@digit.png")
    assert status == 200, body
