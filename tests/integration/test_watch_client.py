"""clients.watch against a real TorchServe serving the cam archive (the cpu config: int8, batches
of 8): an animated GIF and a directory of held-out digits, at 1 and 4 frames in flight. Every frame
gets its overlay PNG and a frame of overlays.gif, and the top-1 printed for each frame is the one
/predictions/cam answers for that frame alone, in frame order. A corrupted frame is named, exits 1,
and the frames around it are still answered."""
from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from clients import watch
from harness.torchserve import TorchServeInstance
from weights import digits

FRAMES = 12
LINE = re.compile(r"^frame (\d{5}) \((.+)\): top-1 (\d+) '(.*)' p=([\d.]+)(?:, ([\d.]+) frames/s)?$")


@pytest.fixture(scope="module")
def server():
    with TorchServeInstance(archives=["cam.mar"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(an animated GIF, a directory of PNGs) of the same held-out digits at 64 px."""
    images, _ = digits.load_arrays()
    _, test = digits.split_indices()
    pils = [digits.to_pil(images[i], 64) for i in test[:FRAMES]]
    root = tmp_path_factory.mktemp("watch-sources")
    gif = root / "digits.gif"
    pils[0].save(gif, save_all=True, append_images=pils[1:], duration=80, loop=0)
    folder = root / "digits"
    folder.mkdir()
    for k, img in enumerate(pils):
        img.save(folder / f"digit-{k}.png")  # frame-10 after frame-9: name order counts numbers
    return {"gif": gif, "dir": folder}


def server_args(ts: TorchServeInstance) -> list[str]:
    return ["--inference-url", ts.url("inference"), "--management-url", ts.url("management"),
            "--key-file", str(ts.dir / "key_file.json")]


def alone(ts: TorchServeInstance, frame: watch.Frame) -> dict:
    """The answer to this frame sent by itself, as clients.watch sends it."""
    return ts.client.predict("cam", {"image": base64.b64encode(frame.data).decode(), "topk": 1, "method": "gradcam"})


def printed(out: str) -> list[tuple]:
    """(frame index, frame name, top-1 index, top-1 label) of each frame line, in printed order."""
    lines = [LINE.match(line) for line in out.splitlines() if line.startswith("frame ")]
    assert all(lines), out
    return [(int(m[1]), m[2], int(m[3]), m[4]) for m in lines]


@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("kind", ["gif", "dir"])
def test_every_frame_answered_in_order(server, sources, kind, in_flight, tmp_path, capsys):
    frames = watch.read_frames(sources[kind])
    assert len(frames) == FRAMES
    expected = [alone(server, f) for f in frames]
    out = tmp_path / "out"
    capsys.readouterr()
    code = watch.main([str(sources[kind]), "--in-flight", str(in_flight), "--out", str(out), *server_args(server)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    tops = [answer["predictions"][0] for answer in expected]
    assert printed(stdout) == [(k, f.name, t["index"], t["label"]) for k, (f, t) in enumerate(zip(frames, tops))]
    assert f"{FRAMES} frames in " in stdout and f"{in_flight} in flight" in stdout

    sizes = [Image.open(io.BytesIO(base64.b64decode(a["cam"]["overlay"]))).size for a in expected]
    pngs = sorted(out.glob("frame-*.png"))
    assert [p.name for p in pngs] == [f"frame-{k:05d}.png" for k in range(FRAMES)]
    for png, size in zip(pngs, sizes):
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size == size
    with Image.open(out / "overlays.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == FRAMES and gif.size == sizes[0]


def test_a_corrupted_frame_is_named_and_the_others_answered(server, sources, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        (folder / f"digit-{k}.png").write_bytes((sources["dir"] / f"digit-{k}.png").read_bytes())
    (folder / "digit-3.png").write_bytes(b"\x89PNG\r\n\x1a\n this frame was cut short")
    (folder / "notes.txt").write_text("not a frame: skipped")
    frames = watch.read_frames(folder)
    assert [f.name for f in frames] == [f"digit-{k}.png" for k in range(6)]
    out = tmp_path / "out"
    capsys.readouterr()
    code = watch.main([str(folder), "--in-flight", "4", "--out", str(out), *server_args(server)])
    captured = capsys.readouterr()
    assert code == 1
    assert "frame 00003 (digit-3.png): error: HTTP 400" in captured.err
    assert "notes.txt" in captured.err  # skipped, and said so
    answered = [k for k in range(len(frames)) if k != 3]
    tops = [alone(server, frames[k])["predictions"][0] for k in answered]
    assert printed(captured.out) == [(k, frames[k].name, t["index"], t["label"]) for k, t in zip(answered, tops)]
    assert "1 failed: digit-3.png" in captured.out
    assert sorted(p.name for p in out.glob("frame-*.png")) == [f"frame-{k:05d}.png" for k in answered]
    with Image.open(out / "overlays.gif") as gif:
        assert gif.n_frames == len(answered)
