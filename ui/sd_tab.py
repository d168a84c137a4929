"""Stable Diffusion tab: txt2img; img2img when a start image is given; inpainting when a mask is
painted over it in the browser (Gradio's image editor; painted = repaint). The seed used is
shown, and "Reuse seed" puts it back into the seed field."""
from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from clients.api import TorchServeClient
from ui.common import Fields, b64_png, png, request_schema, schema_hint

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
                with gr.Row():
                    fields.slot("steps")
                    fields.slot("guidance_scale")
                with gr.Row():
                    width = gr.Number(label="Width (empty = native)", value=None, precision=0, elem_id="sd15-width")
                    height = gr.Number(label="Height (empty = native)", value=None, precision=0, elem_id="sd15-height")
                with gr.Row():
                    fields.slot("width")
                    fields.slot("height")
                with gr.Row():
                    scheduler = gr.Dropdown(label="Scheduler", elem_id="sd15-scheduler")
                    num_images = gr.Number(label="Images", value=1, precision=0, elem_id="sd15-num-images")
                with gr.Row():
                    fields.slot("scheduler")
                    fields.slot("num_images")
                with gr.Row():
                    seed = gr.Number(label="Seed (empty = random)", value=None, precision=0, elem_id="sd15-seed")
                    reuse = gr.Button("Reuse seed", elem_id="sd15-reuse-seed", scale=0)
                fields.slot("seed")
                with gr.Accordion("img2img / inpainting", open=False, elem_id="sd15-img2img"):
                    editor = gr.ImageEditor(
                        label="Start image (img2img); paint over it to inpaint (painted = repaint)",
                        type="pil", sources=["upload", "clipboard"], layers=False, transforms=(),
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), eraser=gr.Eraser(),
                        elem_id="sd15-editor", height=360)
                    fields.slot("image")
                    fields.slot("mask")
                    strength = gr.Number(label="Strength (empty = 0.75 img2img, 1.0 inpainting)", value=None,
                                         elem_id="sd15-strength")
                    fields.slot("strength")
                run = gr.Button("Generate", variant="primary", elem_id="sd15-run")
                fields.status_line()
            with gr.Column(scale=2):
                info = gr.Markdown(elem_id="sd15-info")
                seed_used = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="sd15-seed-used")
                gallery = gr.Gallery(label="Images", columns=4, format="png", object_fit="contain",
                                     elem_id="sd15-gallery", elem_classes="pixelated", height=420)

    def load():
        meta = request_schema(client, MODEL)
        schema = meta.get("request_schema", {})
        yield {
            scheduler: gr.update(choices=meta.get("schedulers", []), value=schema["properties"]["scheduler"]["default"]),
            steps: gr.update(info=schema_hint(schema, "steps")),
            guidance: gr.update(info=schema_hint(schema, "guidance_scale")),
            width: gr.update(info=f"{schema_hint(schema, 'width')}; native {meta.get('native_size')}"),
            height: gr.update(info=schema_hint(schema, "height")),
            num_images: gr.update(info=schema_hint(schema, "num_images")),
            strength: gr.update(info=schema_hint(schema, "strength")),
        }

    def generate(prompt_, negative_, steps_, guidance_, width_, height_, scheduler_, num_images_, seed_,
                 editor_, strength_):
        image, mask = start_image_and_mask(editor_)
        payload = {"prompt": prompt_, "negative_prompt": negative_, "steps": steps_, "guidance_scale": guidance_,
                   "width": width_, "height": height_, "scheduler": scheduler_, "num_images": num_images_,
                   "seed": seed_, "image": image and b64_png(image), "mask": mask and b64_png(mask),
                   "strength": strength_}
        payload = {k: v for k, v in payload.items() if v is not None}
        yield {fields.status: f"generating {steps_} steps ..."}
        result = client.predict(MODEL, payload)
        strength_text = f", strength {result['strength']}" if result.get("strength") is not None else ""
        warnings = "".join(f"\n\n⚠ {w}" for w in result.get("warnings", []))
        yield {
            gallery: [png(b) for b in result["images"] if b is not None],
            seed_used: result["seed"],
            info: (f"**{result['mode']}** · seed **{result['seed']}** · {result['steps']} steps · "
                   f"{result['scheduler']} · guidance {result['guidance_scale']} · "
                   f"{result['width']}x{result['height']}{strength_text}{warnings}"),
        }

    demo.load(fields.guarded(load), outputs=[scheduler, steps, guidance, width, height, num_images, strength,
                                             *fields.outputs])
    run.click(fields.guarded(generate),
              inputs=[prompt, negative, steps, guidance, width, height, scheduler, num_images, seed, editor, strength],
              outputs=[gallery, seed_used, info, *fields.outputs])
    reuse.click(lambda used: used, inputs=seed_used, outputs=seed)
