"""Served PNGs say how they were made, and `python -m clients.verify` re-makes them: a real
TorchServe serving the ddpm and sd15 archives archive.sh built. The record names the archive's
fingerprint and the sha256 of its weights as archive.sh computed them; verify answers identical for
a PNG as served, different (with the figure) for one whose pixels were changed, and says so when a
PNG has no record."""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clients import verify
from harness import REPO
from harness.inprocess import demo_weights
from harness.torchserve import TorchServeInstance

REQUESTS = {
    "ddpm": {"num_images": 2, "steps": 4, "seed": 21},
    "sd15": {"prompt": "a green digit, 5", "steps": 3, "width": 64, "height": 64, "seed": 8, "num_images": 2},
}
WEIGHTS = {"ddpm": "ddpm", "sd15": "sd15"}


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["ddpm.mar", "sd15"]) as ts:
        yield ts


def server_args(ts: TorchServeInstance) -> list[str]:
    return ["--inference-url", ts.url("inference"), "--management-url", ts.url("management"),
            "--key-file", str(ts.dir / "key_file.json")]


def archive_json(model: str) -> dict:
    """archive.json of the archive in model_store/ (a .mar is a zip; sd15 is stored unpacked)."""
    unpacked = REPO / "model_store" / model / "archive.json"
    if unpacked.is_file():
        return json.loads(unpacked.read_text())
    with zipfile.ZipFile(REPO / "model_store" / f"{model}.mar") as z:
        return json.loads(z.read("archive.json"))


def weights_sha256(wdir: Path) -> str:
    """What archive.sh computes: sha256 of `sha256sum` over every file, in byte order of its path."""
    files = sorted((p for p in wdir.rglob("*") if p.is_file()), key=lambda p: str(p.relative_to(wdir)).encode())
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(wdir)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def served_png(ts: TorchServeInstance, model: str, tmp_path: Path) -> Path:
    """The second image of the model's request, saved as it was served."""
    answer = ts.client.predict(model, REQUESTS[model])
    path = tmp_path / f"{model}.png"
    path.write_bytes(base64.b64decode(answer["images"][1]))
    return path


@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_served_pngs_record_the_archive(server, model, tmp_path):
    record = verify.read_record(served_png(server, model, tmp_path))
    info = archive_json(model)
    assert record["image_index"] == 1 and record["model"] == model and record["version"] == "1.0"
    assert (record["fingerprint"], record["weights_sha256"]) == (info["fingerprint"], info["weights_sha256"])
    assert info["weights_sha256"] == weights_sha256(demo_weights(WEIGHTS[model]))
    with Image.open(tmp_path / f"{model}.png") as img:
        assert f"Model hash: {info['weights_sha256'][:10]}, Model: {model}" in img.text["parameters"]


@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_verify_says_identical_for_a_served_png(server, model, tmp_path, capsys):
    path = served_png(server, model, tmp_path)
    capsys.readouterr()
    assert verify.main([str(path), *server_args(server)]) == 0
    assert capsys.readouterr().out.strip().endswith("identical")


def test_verify_says_different_with_the_figure(server, tmp_path, capsys):
    path = served_png(server, "ddpm", tmp_path)
    with Image.open(path) as img:
        text = dict(img.text)
        pixels = img.convert("RGB")
    changed = pixels.point(lambda v: min(255, v + 9))
    changed.putpixel((0, 0), (0, 0, 0) if pixels.getpixel((0, 0))[0] > 128 else (255, 255, 255))
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tampered = tmp_path / "tampered.png"
    changed.save(tampered, pnginfo=info)
    largest, _ = verify.difference(pixels, changed)
    assert largest > verify.CROSS_ARCH_LEVELS
    capsys.readouterr()
    assert verify.main([str(tampered), *server_args(server)]) == 1
    assert f"different: largest difference {largest} grey levels" in capsys.readouterr().out


def test_verify_without_a_record_says_so(server, tmp_path, capsys):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    assert verify.main([str(bare), *server_args(server)]) == 2
    assert "has no 'serving' record" in capsys.readouterr().err


def test_verdicts():
    assert verify.verdict(0, 0.0) == ("identical", True)
    assert verify.verdict(verify.CROSS_ARCH_LEVELS, 0.01)[1] is True
    assert verify.verdict(verify.CROSS_ARCH_LEVELS + 1, 0.01)[1] is False
    with pytest.raises(ValueError, match="differ in size"):
        verify.difference(Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5)))
