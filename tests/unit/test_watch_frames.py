"""clients.watch without a server: the frame reader (an animated GIF frame by frame, a directory in
name order with its non-image entries skipped) and the windowed sender on a fake client (frames in
flight at once, answers in frame order whatever order they arrive in, a refused frame kept as its
error, any other error raised)."""
from __future__ import annotations

import base64
import io
import threading

import pytest
from PIL import Image

from clients.api import ServerError
from clients.watch import Frame, frame_files, read_frames, send_frames


def shades(count: int, size: int = 16) -> list[Image.Image]:
    """Distinct grey frames (a GIF merges identical consecutive ones)."""
    return [Image.new("L", (size, size), 20 + 40 * i) for i in range(count)]


def test_an_animated_gif_is_read_frame_by_frame(tmp_path):
    images = shades(5)
    gif = tmp_path / "clip.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=50, loop=0)
    frames = read_frames(gif)
    assert [f.name for f in frames] == [f"clip.gif[{i}]" for i in range(5)]
    for frame, image in zip(frames, images):
        decoded = Image.open(io.BytesIO(frame.data))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == image.size
        assert decoded.getpixel((3, 3)) == (image.getpixel((3, 3)),) * 3


def test_a_still_image_is_one_frame(tmp_path):
    shades(1)[0].save(tmp_path / "one.png")
    assert [f.name for f in read_frames(tmp_path / "one.png")] == ["one.png[0]"]


def test_a_directory_is_read_in_name_order_numbers_as_numbers(tmp_path):
    for name, image in zip(("frame-10.png", "frame-9.png", "frame-1.jpg", "b.PNG", "a.png"), shades(5)):
        image.save(tmp_path / name)
    frames = read_frames(tmp_path)
    assert [f.name for f in frames] == ["a.png", "b.PNG", "frame-1.jpg", "frame-9.png", "frame-10.png"]
    assert frames[-1].data == (tmp_path / "frame-10.png").read_bytes()  # sent as it is


def test_entries_that_are_not_frame_images_are_skipped_and_listed(tmp_path):
    shades(1)[0].save(tmp_path / "frame-0.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "sub").mkdir()
    (tmp_path / "corrupt.png").write_bytes(b"not a png")  # a frame name: sent, the server judges it
    assert [f.name for f in read_frames(tmp_path)] == ["corrupt.png", "frame-0.png"]
    assert sorted(p.name for p in frame_files(tmp_path)[1]) == [".DS_Store", "notes.txt", "sub"]


def test_no_frame_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a frame")
    with pytest.raises(ValueError, match="no frame images"):
        read_frames(tmp_path)
    with pytest.raises(ValueError, match="neither a directory nor an image"):
        read_frames(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.gif")


class FakeClient:
    """Answers frame b"<i>" with {"index": i}. The first `window` frames are held until `window`
    requests are in flight at once, and frame 0 then until frame 1 is answered: with more than one
    in flight, the answers arrive out of order. Records the most requests in flight at once."""

    def __init__(self, window: int = 1, refuse: dict[int, int] | None = None):
        self.window, self.refuse = window, refuse or {}
        self.cond = threading.Condition()
        self.busy = self.most = 0
        self.done: list[int] = []  # frames in the order they were answered

    def predict(self, model, payload, version=None):
        i = int(base64.b64decode(payload["image"]))
        with self.cond:
            self.busy += 1
            self.most = max(self.most, self.busy)
            self.cond.notify_all()
            if i < self.window:
                self.cond.wait_for(lambda: self.most >= self.window, timeout=30)
            if i == 0 and self.window > 1:
                self.cond.wait_for(lambda: 1 in self.done, timeout=30)
        try:
            if i in self.refuse:
                raise ServerError(self.refuse[i], {"error": f"frame {i} refused"}, f"/predictions/{model}")
            return {"index": i, "topk": payload["topk"]}
        finally:
            with self.cond:
                self.busy -= 1
                self.done.append(i)
                self.cond.notify_all()


def numbered(count: int) -> list[Frame]:
    return [Frame(f"f{i}", str(i).encode()) for i in range(count)]


@pytest.mark.parametrize("in_flight", [1, 3])
def test_answers_come_back_in_frame_order(in_flight):
    client, seen = FakeClient(window=in_flight), []
    answers, elapsed = send_frames(client, "cam", numbered(10), in_flight, params={"topk": 1},
                                   on_answer=lambda i, frame, answer: seen.append((i, frame.name, answer["index"])))
    assert [a["index"] for a in answers] == list(range(10)) and all(a["topk"] == 1 for a in answers)
    assert seen == [(i, f"f{i}", i) for i in range(10)]
    assert client.most == in_flight and elapsed > 0
    if in_flight > 1:
        assert client.done.index(1) < client.done.index(0)  # arrived out of order, shown in order


def test_a_refused_frame_is_its_error_and_the_others_are_answered():
    answers, _ = send_frames(FakeClient(window=3, refuse={4: 400}), "cam", numbered(8), 3, params={"topk": 1})
    assert isinstance(answers[4], ServerError) and answers[4].status == 400
    assert [a["index"] for i, a in enumerate(answers) if i != 4] == [0, 1, 2, 3, 5, 6, 7]


def test_any_other_error_stops_the_run():
    with pytest.raises(ServerError, match="frame 2 refused"):
        send_frames(FakeClient(window=2, refuse={2: 404}), "cam", numbered(8), 2, params={"topk": 1})
    with pytest.raises(ValueError):
        send_frames(FakeClient(), "cam", numbered(2), 0)
