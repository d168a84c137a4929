"""Watch frames live with the `cam` model: keeps N frames in flight, prints each frame's top-1 and
the running frames/s, saves every overlay and an animated GIF of them.

    python -m clients.watch SOURCE [--in-flight 4] [--out outputs/watch] [--topk 1] [--method gradcam]

SOURCE is a directory of frame images, taken in name order (numbers compared as numbers:
frame-9.png before frame-10.png), or an animated image file (a GIF, read frame by frame).
"""
from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageSequence, UnidentifiedImageError
from tqdm import tqdm

from clients.api import ServerError, TorchServeClient
from clients.options import add_server_options, client_from

# Files of a frame directory that are frames; any other file (notes.txt, a hidden .DS_Store) and
# any subdirectory is skipped. A frame file is sent as it is: the server judges its content.
FRAME_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# Answers that are the frame's fault (not an image, too large, ...): reported, and the run goes on.
# Any other error (unknown model, server gone) stops the run.
FRAME_ERRORS = frozenset({400, 413})
GIF_FRAME_MS = 100  # overlays.gif plays at 10 frames/s, whatever the rate the frames were answered at


class Frame(NamedTuple):
    name: str  # the file's name, or "<gif name>[<index>]" for a frame of an animated file
    data: bytes  # the encoded image sent to the server (PNG for a frame of an animated file)


def _name_order(path: Path) -> list:
    """Sort key: digit runs compared as numbers, so frame-9 comes before frame-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def frame_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(the frame files of `directory` in name order, the entries skipped: not a frame file name)."""
    entries = sorted(directory.iterdir(), key=_name_order)
    is_frame = [p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES for p in entries]
    return [p for p, f in zip(entries, is_frame) if f], [p for p, f in zip(entries, is_frame) if not f]


def read_frames(source: str | Path) -> list[Frame]:
    """The frames of `source`, in order: a directory's frame files (FRAME_SUFFIXES, name order;
    other entries skipped), each sent as its bytes, unopened; or each frame of an animated image
    file (a still image is one frame), as RGB PNG. ValueError when there is no frame to send."""
    source = Path(source)
    if source.is_dir():
        files, _ = frame_files(source)
        if not files:
            raise ValueError(f"{source}: no frame images (file names ending in {', '.join(sorted(FRAME_SUFFIXES))})")
        return [Frame(p.name, p.read_bytes()) for p in files]
    try:
        image = Image.open(source)
    except UnidentifiedImageError as exc:
        raise ValueError(f"{source}: neither a directory nor an image file (an animated GIF)") from exc
    frames = []
    with image:
        for index, frame in enumerate(ImageSequence.Iterator(image)):
            buf = io.BytesIO()
            frame.convert("RGB").save(buf, format="PNG")
            frames.append(Frame(f"{source.name}[{index}]", buf.getvalue()))
    return frames


Answer = dict | ServerError  # the model's JSON answer, or the refusal of that frame


def send_frames(client: TorchServeClient, model: str, frames: list[Frame], in_flight: int,
                params: dict | None = None, version: str | None = None,
                on_answer: Callable[[int, Frame, Answer], Any] | None = None) -> tuple[list[Answer], float]:
    """Sends every frame as `{"image": <base64>, **params}`, `in_flight` requests at a time (a new
    one leaves as soon as one is answered), and returns (the answers in frame order, seconds from
    the first request to the last answer). `on_answer(index, frame, answer)` is called in frame
    order as soon as a frame and all those before it are answered. A frame the server refuses
    (FRAME_ERRORS) is answered by its ServerError; any other error is raised."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, not {in_flight}")
    params = dict(params or {})

    def ask(frame: Frame) -> dict:
        return client.predict(model, {"image": base64.b64encode(frame.data).decode("ascii"), **params},
                              version=version)

    answers: list[Answer | None] = [None] * len(frames)
    arrived: dict[int, Answer] = {}  # answered, waiting for an earlier frame
    shown = 0  # frames passed to on_answer, in order
    pending: dict[Future, int] = {}
    queue = iter(range(len(frames)))
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="watch") as pool:
        def submit_next() -> None:
            index = next(queue, None)
            if index is not None:
                pending[pool.submit(ask, frames[index])] = index

        start = time.perf_counter()
        try:
            for _ in range(in_flight):
                submit_next()
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    try:
                        arrived[index] = future.result()
                    except ServerError as exc:
                        if exc.status not in FRAME_ERRORS:
                            raise
                        arrived[index] = exc
                    submit_next()  # before on_answer: its work does not hold the window back
                while shown in arrived:
                    answers[shown] = arrived.pop(shown)
                    if on_answer is not None:
                        on_answer(shown, frames[shown], answers[shown])
                    shown += 1
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        elapsed = time.perf_counter() - start
    return answers, elapsed


def save_gif(images: list[Image.Image], path: Path, frame_ms: int = GIF_FRAME_MS) -> Path:
    """An animated GIF that loops. Pillow shows identical consecutive images as one longer frame."""
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a directory of frame images, or an animated GIF")
    parser.add_argument("--in-flight", type=int, default=4, metavar="N", help="requests sent at once (default 4)")
    parser.add_argument("--out", type=Path, default=Path("outputs/watch"),
                        help="folder for frame-00000.png ... (the overlays) and overlays.gif")
    parser.add_argument("--model", default="cam")
    parser.add_argument("--version", help="model version (default: the default version)")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--method", default="gradcam", help="gradcam (fast), gradcam++, layercam, scorecam, ...")
    parser.add_argument("--fps-every", type=int, default=1, metavar="K",
                        help="the running frames/s on every K-th frame line and the last (0: only in the summary)")
    add_server_options(parser)
    args = parser.parse_args(argv)
    if args.in_flight < 1:
        parser.error("--in-flight must be at least 1")
    try:
        frames = read_frames(args.source)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.source.is_dir() and (skipped := frame_files(args.source)[1]):
        print(f"skipped {len(skipped)} entries of {args.source} that are not frame images: "
              f"{', '.join(p.name for p in skipped)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    client = client_from(args)
    overlays: list[Image.Image] = []
    failed: list[str] = []
    # disable=None: no bar when stderr is not a terminal (a log file keeps the frame lines only)
    bar = tqdm(total=len(frames), desc=f"{args.model}, {args.in_flight} in flight", unit="frame", file=sys.stderr,
               bar_format="{desc}: {n}/{total} frames |{bar}|{postfix}", disable=None)
    started = time.perf_counter()

    def show(index: int, frame: Frame, answer: Answer) -> None:
        fps = (index + 1) / (time.perf_counter() - started)
        bar.set_postfix_str(f"{fps:.1f} frames/s", refresh=False)
        bar.update(1)
        if isinstance(answer, ServerError):
            failed.append(frame.name)
            tqdm.write(f"frame {index:05d} ({frame.name}): error: {answer}", file=sys.stderr)
            return
        png = base64.b64decode(answer["cam"]["overlay"])
        (args.out / f"frame-{index:05d}.png").write_bytes(png)
        overlay = Image.open(io.BytesIO(png))
        overlay.load()
        overlays.append(overlay)
        top = answer["predictions"][0]
        line = f"frame {index:05d} ({frame.name}): top-1 {top['index']} '{top['label']}' p={top['probability']:.4f}"
        if args.fps_every > 0 and ((index + 1) % args.fps_every == 0 or index + 1 == len(frames)):
            line += f", {fps:.1f} frames/s"
        tqdm.write(line, file=sys.stdout)

    try:
        _, elapsed = send_frames(client, args.model, frames, args.in_flight, version=args.version,
                                 params={"topk": args.topk, "method": args.method}, on_answer=show)
    except (ServerError, OSError) as exc:  # OSError: requests' connection errors among them
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(f"{len(frames)} frames in {elapsed:.2f} s: {len(frames) / elapsed:.1f} frames/s, "
          f"{args.in_flight} in flight" + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    if overlays:
        gif = save_gif(overlays, args.out / "overlays.gif")
        print(f"overlays: {args.out}/frame-*.png ({len(overlays)}), {gif}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
