"""Bad requests for every model, shared by the in-process and the real-server tests and replayed by
the reliability benchmark.

Each case: (id, payload as bytes or a JSON-able dict, the field the 400 must name).
"""
from __future__ import annotations

import base64

from PIL import Image

from harness.inprocess import png_bytes


def good_png() -> bytes:
    return png_bytes(Image.new("L", (32, 32), 0))


def noisy_png() -> bytes:
    """A 64x64 noise PNG: big enough that cutting it in half keeps the header intact."""
    return png_bytes(Image.frombytes("L", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64))))


def bomb_png() -> bytes:
    """A ~30 kB PNG that decodes to 20000 x 20000 = 400 M pixels."""
    return png_bytes(Image.new("1", (20000, 20000), 0))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def cam_cases() -> list[tuple[str, bytes | dict, str]]:
    png = good_png()
    noisy = noisy_png()
    return [
        ("undecodable-bytes", b"this is not an image", "body"),
        ("truncated-png", noisy[: len(noisy) // 2], "body"),
        ("decompression-bomb", bomb_png(), "body"),
        ("bomb-in-json", {"image": b64(bomb_png())}, "image"),
        ("invalid-base64", {"image": "***not base64***"}, "image"),
        ("image-wrong-type", {"image": 12345}, "image"),
        ("image-missing", {"topk": 3}, "image"),
        ("topk-string", {"image": b64(png), "topk": "5"}, "topk"),
        ("topk-zero", {"image": b64(png), "topk": 0}, "topk"),
        ("topk-too-large", {"image": b64(png), "topk": 11}, "topk"),
        ("topk-float", {"image": b64(png), "topk": 2.5}, "topk"),
        ("target-out-of-range", {"image": b64(png), "target": 10}, "target"),
        ("unknown-field", {"image": b64(png), "colour": "red"}, "colour"),
        ("unknown-method", {"image": b64(png), "method": "magic"}, "method"),
    ]


def ddpm_cases() -> list[tuple[str, bytes | dict, str]]:
    return [
        ("steps-zero", {"steps": 0}, "steps"),
        ("steps-too-many", {"steps": 1001}, "steps"),
        ("num-images-zero", {"num_images": 0}, "num_images"),
        ("num-images-too-many", {"num_images": 17}, "num_images"),
        ("eta-negative", {"eta": -0.1}, "eta"),
        ("eta-too-big", {"eta": 1.5}, "eta"),
        ("eta-with-ddpm", {"scheduler": "ddpm", "eta": 0.5, "steps": 5}, "eta"),
        ("unknown-scheduler", {"scheduler": "lms"}, "scheduler"),
        ("seed-float", {"seed": 1.5}, "seed"),
        ("seed-string", {"seed": "42"}, "seed"),
        ("seed-negative", {"seed": -1}, "seed"),
        ("unknown-field", {"prompt": "a cat"}, "prompt"),
        ("not-json", b"\x89PNG not json", "body"),
        ("json-array", b"[1, 2]", "body"),
        ("stream-not-bool", {"stream": "yes"}, "stream"),
        ("preview-without-stream", {"preview_every": 2}, "preview_every"),
        ("negative-preview-every", {"stream": True, "preview_every": -1}, "preview_every"),
        ("request-id-short", {"request_id": "abc"}, "request_id"),
        ("request-id-path", {"request_id": "../../etc/passwd"}, "request_id"),
        ("request-id-number", {"request_id": 12345678}, "request_id"),
    ]


def sd15_cases() -> list[tuple[str, bytes | dict, str]]:
    png = b64(noisy_png())  # 64x64
    small_mask = b64(png_bytes(Image.new("L", (32, 32), 255)))
    base = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64}
    return [
        ("prompt-missing", {"steps": 2}, "prompt"),
        ("prompt-not-string", {**base, "prompt": ["a", "b"]}, "prompt"),
        ("width-not-multiple-of-8", {**base, "width": 100}, "width"),
        ("height-too-small", {**base, "height": 32}, "height"),
        ("width-too-large", {**base, "width": 4096}, "width"),
        ("steps-zero", {**base, "steps": 0}, "steps"),
        ("steps-too-many", {**base, "steps": 10000}, "steps"),
        ("guidance-negative", {**base, "guidance_scale": -1}, "guidance_scale"),
        ("guidance-too-large", {**base, "guidance_scale": 100}, "guidance_scale"),
        ("image-undecodable", {**base, "image": b64(b"not an image")}, "image"),
        ("mask-size-mismatch", {**base, "image": png, "mask": small_mask}, "mask"),
        ("mask-without-image", {**base, "mask": small_mask}, "mask"),
        ("strength-zero", {**base, "image": png, "strength": 0}, "strength"),
        ("strength-above-one", {**base, "image": png, "strength": 1.5}, "strength"),
        ("strength-leaves-no-step", {**base, "image": png, "steps": 1, "strength": 0.5}, "strength"),
        ("unknown-field", {**base, "cfg": 7}, "cfg"),
        ("unknown-scheduler", {**base, "scheduler": "lms"}, "scheduler"),
        ("stream-not-bool", {**base, "stream": 1}, "stream"),
        ("preview-vae-without-stream", {**base, "preview_vae": True}, "preview_vae"),
        ("request-id-too-long", {**base, "request_id": "x" * 65}, "request_id"),
        ("request-id-space", {**base, "request_id": "my request 1"}, "request_id"),
        ("lora-unknown", {**base, "loras": [{"name": "no-such-lora"}]}, "loras"),
        ("lora-not-a-list", {**base, "loras": {"name": "x"}}, "loras"),
        ("lora-scale-not-number", {**base, "loras": [{"name": "x", "scale": "high"}]}, "loras"),
    ]
