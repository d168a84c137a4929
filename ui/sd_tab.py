"""Stable Diffusion tab: txt2img; img2img when a start image is given; inpainting when a mask is
painted over it in the browser (Gradio's image editor; painted = repaint). The seed used is
shown, and "Reuse seed" puts it back into the seed field. "Cancel" stops the running request on
the server by its request id (the `jobs` archive, docs/jobs.md)."""
from __future__ import annotations

import secrets

import gradio as gr
import numpy as np
from PIL import Image

from clients.api import TorchServeClient
from ui.common import Fields, b64_png, optional_number, png, schema_hint, schema_updates, streamed

MODEL = "sd15"


def start_image_and_mask(editor: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The editor's background (the start image) and the union of its painted layers as a
    white-on-black mask, or None when nothing was painted."""
    if not editor or editor.get("background") is None:
        return None, None
    background = editor["background"].convert("RGB")
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in editor.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA").resize(background.size, Image.NEAREST))[..., 3]
        painted |= alpha > 0
    mask = Image.fromarray(painted.astype(np.uint8) * 255) if painted.any() else None
    return background, mask


def build(demo: gr.Blocks, client: TorchServeClient) -> None:
    fields = Fields(client, MODEL)
    with gr.Tab("Stable Diffusion", id="sd15"):
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value="a red handwritten 7", elem_id="sd15-prompt")
                fields.slot("prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="sd15-negative-prompt")
                fields.slot("negative_prompt")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=25, precision=0, elem_id="sd15-steps")
                    guidance = gr.Number(label="Guidance", value=7.5, elem_id="sd15-guidance-scale")
                    scheduler = gr.Dropdown(label="Scheduler", elem_id="sd15-scheduler")
                with gr.Row():
                    fields.slot("steps")
                    fields.slot("guidance_scale")
                    fields.slot("scheduler")
                with gr.Row():
                    width = gr.Textbox(label="Width", placeholder="native", elem_id="sd15-width")
                    height = gr.Textbox(label="Height", placeholder="native", elem_id="sd15-height")
                    num_images = gr.Number(label="Images", value=1, precision=0, elem_id="sd15-num-images")
                with gr.Row():
                    fields.slot("width")
                    fields.slot("height")
                    fields.slot("num_images")
                seed = gr.Textbox(label="Seed", placeholder="random", elem_id="sd15-seed")
                fields.slot("seed")
                with gr.Accordion("img2img / inpainting", open=False, elem_id="sd15-img2img"):
                    editor = gr.ImageEditor(
                        label="Start image (img2img); paint over it to inpaint (painted = repaint)",
                        type="pil", sources=["upload", "clipboard"], layers=False, transforms=(),
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=4), eraser=gr.Eraser(),
                        elem_id="sd15-editor", height=360)
                    mode = gr.Markdown("txt2img: no start image", elem_id="sd15-mode")
                    fields.slot("image")
                    fields.slot("mask")
                    strength = gr.Textbox(label="Strength", placeholder="0.75 img2img, 1.0 inpainting",
                                          elem_id="sd15-strength")
                    fields.slot("strength")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="sd15-run", scale=3)
                    cancel = gr.Button("Cancel", variant="stop", elem_id="sd15-cancel", scale=1)
                request_id = gr.Textbox(label="Request id", interactive=False, elem_id="sd15-request-id")
                fields.status_line()
            with gr.Column(scale=1):
                info = gr.Markdown(elem_id="sd15-info")
                with gr.Row(equal_height=True):
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="sd15-seed-used", scale=3)
                    reuse = gr.Button("Reuse seed", elem_id="sd15-reuse-seed", scale=1)
                gallery = gr.Gallery(label="Images", columns=2, format="png", object_fit="contain",
                                     elem_id="sd15-gallery", elem_classes="pixelated", height="auto", preview=False)

    def load():
        updates, meta = schema_updates(client, MODEL, scheduler, {
            steps: "steps", guidance: "guidance_scale", num_images: "num_images", strength: "strength"})
        schema = meta.get("request_schema", {})
        for component, name in ((width, "width"), (height, "height")):
            updates[component] = gr.update(info=schema_hint(schema, name), placeholder=f"native ({meta.get('native_size')})")
        yield updates

    def describe_mode(editor_) -> str:
        """What Generate will run with the editor as it is now (the request's `mode`)."""
        image, mask = start_image_and_mask(editor_)
        if image is None:
            return "txt2img: no start image"
        if mask is None:
            return f"img2img from the {image.width}x{image.height} start image"
        share = np.asarray(mask).astype(bool).mean()
        return f"inpainting: {share:.0%} of the {image.width}x{image.height} start image is repainted"

    def generate(prompt_, negative_, steps_, guidance_, width_, height_, scheduler_, num_images_, seed_,
                 editor_, strength_):
        image, mask = start_image_and_mask(editor_)
        payload = {"prompt": prompt_, "negative_prompt": negative_, "steps": steps_, "guidance_scale": guidance_,
                   "width": optional_number(width_, "width"), "height": optional_number(height_, "height"),
                   "scheduler": scheduler_, "num_images": num_images_, "seed": optional_number(seed_, "seed"),
                   "image": image and b64_png(image), "mask": mask and b64_png(mask),
                   "strength": optional_number(strength_, "strength", float)}
        payload = {k: v for k, v in payload.items() if v is not None}
        payload["request_id"] = secrets.token_urlsafe(16)  # the page's own, so that Cancel can name it
        yield {info: f"generating {steps_} steps ...", request_id: payload["request_id"]}
        result = yield from streamed(client, MODEL, payload, info, gallery)
        if result is None:  # cancelled: the progress line says at which step
            return
        strength_text = f", strength {result['strength']}" if result.get("strength") is not None else ""
        warnings = "".join(f"\n\n⚠ {w}" for w in result.get("warnings", []))
        yield {
            gallery: [png(b) for b in result["images"] if b is not None],
            seed_used: str(result["seed"]),
            info: (f"**{result['mode']}** · seed **{result['seed']}** · {result['steps']} steps · "
                   f"{result['scheduler']} · guidance {result['guidance_scale']} · "
                   f"{result['width']}x{result['height']}{strength_text}{warnings}"),
        }

    demo.load(fields.guarded(load), outputs=[scheduler, steps, guidance, width, height, num_images, strength,
                                             *fields.outputs])
    def cancel_request(request_id_: str):
        if request_id_:
            client.cancel(MODEL, request_id_)
        yield {}

    run.click(fields.guarded(generate),
              inputs=[prompt, negative, steps, guidance, width, height, scheduler, num_images, seed, editor, strength],
              outputs=[gallery, seed_used, info, request_id, *fields.outputs])
    cancel.click(fields.guarded(cancel_request), inputs=request_id, outputs=fields.outputs)
    editor.change(describe_mode, inputs=editor, outputs=mode, trigger_mode="always_last")
    reuse.click(lambda used: used, inputs=seed_used, outputs=seed)
