"""Single-file SD1.5 checkpoints (weights/single_file.py through archive.sh): the original layout
converts back to the very tensors it was written from, offline; an fp16 file stays fp16; every
file that is no SD1.5 checkpoint is refused in one line with nothing written to the store; a file
archive's Model hash is the file's own sha256 and a changed file is not skipped."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from handlers.core import provenance
from harness import sd15_single_file as fx
from harness.torchserve import run_archive_sh
from weights import build_all, single_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> fx.Fixture:
    return fx.write_fixture(tmp_path_factory.mktemp("single-file"))


@pytest.fixture
def offline(monkeypatch):
    """No connection can be opened: anything that reaches for the hub fails."""
    def refuse(*args, **kwargs):
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(directory, dtype=torch.float32):
    """A diffusers directory as the handler loads it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(directory), local_files_only=True, dtype=dtype)


def test_the_fixture_file_is_what_diffusers_takes_for_sd15(fixture):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(load_file(str(fixture.fp32))) == "v1"


def test_the_shipped_config_tree_is_sd15s():
    """weights/sd15-config builds SD1.5's components (their published parameter counts), and a
    header with SD1.5's names and shapes passes every check against it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tree = single_file.DEFAULT_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tree, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tree, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(tree, subfolder="text_encoder"))
    assert [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)] == [859_520_964, 83_653_863, 123_060_480]
    state = fx.to_original(unet.state_dict(), vae.state_dict(), text.state_dict())
    header = {k: {"dtype": "F16", "shape": list(v.shape)} for k, v in state.items()}
    single_file.identify(header, tree)
    single_file.check_layout(header, tree)
    assert single_file.file_dtype(header) == "float16"


def test_round_trip_gives_the_same_tensors(fixture, tmp_path, offline):
    """directory -> original-layout file -> diffusers' single-file loader with the config tree ->
    every module's state dict equal to the directory's."""
    assert single_file.convert(fixture.fp32, tmp_path / "converted", fixture.config_tree) == "float32"
    original, converted = load(fixture.directory), load(tmp_path / "converted")
    for name in COMPONENTS:
        a, b = getattr(original, name).state_dict(), getattr(converted, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert converted.scheduler.config == original.scheduler.config
    prompt = "a lighthouse at dusk"
    assert converted.tokenizer(prompt).input_ids == original.tokenizer(prompt).input_ids
    assert converted.safety_checker is None and converted.feature_extractor is None


def test_an_fp16_file_stays_fp16_and_loads_as_its_rounded_weights(fixture, tmp_path):
    assert single_file.convert(fixture.fp16, tmp_path / "fp16", fixture.config_tree) == "float16"
    for path in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        with safe_open(str(tmp_path / "fp16" / path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    original, fp16 = load(fixture.directory), load(tmp_path / "fp16", torch.float32)  # the cpu target's cast
    for name in COMPONENTS:
        a, b = getattr(original, name).state_dict(), getattr(fp16, name).state_dict()
        assert all(b[k].dtype == torch.float32 and torch.equal(a[k].half().float(), b[k]) for k in a), name


# (case, what is written, file name, what the one line says); "good" is the fixture's own file.
REFUSALS = [
    ("sd2", "sd2", "sd2.safetensors", ("is an SD2 checkpoint", "1024 wide", "expected an SD1.5 checkpoint")),
    ("sdxl", "sdxl", "sdxl.safetensors", ("is an SDXL checkpoint", "2048 wide")),
    ("lora-kohya", "lora-kohya", "lora.safetensors", ("is a LoRA", "lora_down", "not a checkpoint")),
    ("lora-peft", "lora-peft", "lora.safetensors", ("is a LoRA", "lora_A")),
    ("no-unet", "no-unet", "x.safetensors", ("has no UNet (model.diffusion_model.*)",)),
    ("no-vae", "no-vae", "x.safetensors", ("has no VAE (first_stage_model.*)",)),
    ("no-text-encoder", "no-text-encoder", "x.safetensors", ("has no CLIP text encoder",)),
    ("inpainting", "inpainting", "x.safetensors", ("is an inpainting checkpoint", "9 input channels")),
    ("context-1024", "context-1024", "x.safetensors", ("1024-wide cross-attention", "SD2's", "expects 32")),
    ("missing-layer", "missing-layer", "x.safetensors", ("lacks 46 of the 686 UNet weights",)),
    ("truncated", "truncated", "x.safetensors", ("is truncated", "interrupted")),
    ("renamed-pickle", "pickle", "x.safetensors", ("is not a safetensors file", "pickle", "runs code")),
    ("ckpt", "pickle", "x.ckpt", ("is a pickle (.ckpt)", "runs code", "only .safetensors")),
    ("pt", "pickle", "x.pt", ("is a pickle (.pt)",)),
    ("default-tree", "good", "x.safetensors", ("32-wide cross-attention", "sd15-config expects 768")),
]


@pytest.mark.parametrize("case, kind, name, says", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_file_that_is_no_sd15_checkpoint_is_refused_in_one_line(fixture, tmp_path, case, kind, name, says):
    path = tmp_path / name
    if kind == "good":
        shutil.copy(fixture.fp32, path)
    else:
        fx.write_foreign(kind, fixture.fp32, path)
    tree = [] if case == "default-tree" else ["--config-tree", str(fixture.config_tree)]
    store = tmp_path / "store"
    run = run_archive_sh("--store", str(store), "--weights", str(path), *tree, "sd15")
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"single_file: {path} ") and all(s in lines[0] for s in says), lines[0]
    assert not list(store.iterdir()), "something was written to the model store"


def test_a_file_is_refused_for_cam(fixture, tmp_path):
    run = run_archive_sh("--store", str(tmp_path / "store"), "--weights", str(fixture.fp32), "cam")
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"archive.sh: weights for 'cam' must be a directory: a single-file "
                                                f"checkpoint ({fixture.fp32}) is read for sd15 only"]


def test_file_archive_model_hash_and_fingerprint(fixture, tmp_path):
    """archive.json's weights_sha256 is the file's sha256 (A1111's and civitai's hash; the PNGs'
    Model hash is its first 10 hex digits); an unchanged file is skipped without converting it, a
    changed one is not skipped (here: refused, and the archive built before stays as it was)."""
    store, path = tmp_path / "store", tmp_path / "model.safetensors"
    shutil.copy(fixture.fp16, path)
    args = ("--store", str(store), "--weights", str(path), "--config-tree", str(fixture.config_tree), "sd15")
    built = run_archive_sh(*args)
    assert built.returncode == 0, built.stderr
    info = json.loads((store / "sd15" / "archive.json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["weights_sha256"] == digest and provenance.model_hash(info) == digest[:10]
    index = json.loads((store / "sd15" / "weights" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]

    again = run_archive_sh(*args)
    assert again.returncode == 0 and "is up to date" in again.stdout and "single_file" not in again.stdout + again.stderr

    fx.write_foreign("truncated", fixture.fp16, path)
    changed = run_archive_sh(*args)
    assert changed.returncode != 0 and "is truncated" in changed.stderr
    assert json.loads((store / "sd15" / "archive.json").read_text()) == info
    # nothing half-written beside the archives (jobs.mar comes with every sd15 build: docs/jobs.md)
    assert sorted(p.name for p in store.iterdir()) == [".jobs.fingerprint", ".sd15.fingerprint", "jobs.mar", "sd15"]


def test_make_weights_takes_a_file_in_sd15_weights(fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("SD15_CONFIG_TREE", str(fixture.config_tree))
    monkeypatch.setenv("SD15_WEIGHTS", str(fixture.fp16))
    build_all.prepare_pretrained("sd15", tmp_path / "pretrained")  # checked, left for archive.sh
    assert not (tmp_path / "pretrained").exists()
    monkeypatch.setenv("SD15_WEIGHTS", str(fx.write_foreign("pickle", fixture.fp32, tmp_path / "model.ckpt")))
    with pytest.raises(SystemExit, match=r"^SD15_WEIGHTS=\S+model.ckpt is a pickle \(.ckpt\)"):
        build_all.prepare_pretrained("sd15", tmp_path / "pretrained")
