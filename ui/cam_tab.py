"""Classify + CAM tab: an uploaded image, its top-k classes, the CAM overlay and the raw map, for
one or several registered versions of `cam` side by side (the fine-tuning lab's 1.0 and 2.0)."""
from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

from clients.api import TorchServeClient, encode_file
from ui.common import FieldError, Fields, png, request_schema, schema_hint

MODEL = "cam"
MAX_VERSIONS = 3  # result columns laid out in advance; Gradio's layout is static
PREDICTED = -1  # the target dropdown's "predicted class"


def map_image(cam_map: list[list[float]], size: tuple[int, int]) -> Image.Image:
    """The coarse 0..1 map as a heat image (black, red, yellow), blown up to `size` in blocks so
    that its real resolution stays visible."""
    gray = Image.fromarray((np.clip(np.asarray(cam_map, dtype=np.float32), 0, 1) * 255).astype(np.uint8))
    return ImageOps.colorize(gray, black="black", mid="red", white="yellow").resize(size, Image.NEAREST)


def build(demo: gr.Blocks, client: TorchServeClient) -> None:
    fields = Fields(client, MODEL)
    with gr.Tab("Classify + CAM", id="cam"):
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: the uploaded file goes to the server untouched (EXIF orientation,
                # 16-bit, transparency are handled there, as for every other client).
                image = gr.Image(type="filepath", image_mode=None, label="Image (upload, drop or paste)",
                                 sources=["upload", "clipboard"], elem_id="cam-image", height=260)
                fields.slot("image")
                versions = gr.CheckboxGroup(label="Versions (several: side by side)", elem_id="cam-versions")
                fields.slot("version")
                method = gr.Dropdown(label="CAM method", elem_id="cam-method")
                fields.slot("method")
                target = gr.Dropdown(label="Target class", elem_id="cam-target")
                fields.slot("target")
                topk = gr.Number(label="Top-k", value=5, precision=0, elem_id="cam-topk")
                fields.slot("topk")
                run = gr.Button("Classify", variant="primary", elem_id="cam-run")
                fields.status_line()
            with gr.Row(scale=3):
                columns = []
                for i in range(MAX_VERSIONS):
                    with gr.Column(visible=False, elem_id=f"cam-result-{i}") as col:
                        title = gr.Markdown(elem_id=f"cam-title-{i}")
                        table = gr.Dataframe(headers=["class", "label", "probability"], interactive=False,
                                             elem_id=f"cam-topk-{i}")
                        with gr.Row():
                            overlay = gr.Image(label="CAM overlay", format="png", interactive=False,
                                               elem_id=f"cam-overlay-{i}", height=240)
                            raw = gr.Image(label="raw map", format="png", interactive=False,
                                           elem_id=f"cam-map-{i}", height=240)
                    columns.append((col, title, table, overlay, raw))

    def load():
        meta = request_schema(client, MODEL)
        described = client.describe(MODEL, "all")
        default = client.describe(MODEL)[0]["modelVersion"]
        labels = meta.get("labels", [])
        yield {
            versions: gr.update(choices=[d["modelVersion"] for d in described], value=[default]),
            method: gr.update(choices=meta.get("methods", []), value=meta.get("methods", [None])[0]),
            target: gr.update(choices=[("predicted class", PREDICTED)] + [(f"{i}: {n}", i) for i, n in enumerate(labels)],
                              value=PREDICTED),
            topk: gr.update(info=schema_hint(meta.get("request_schema", {}), "topk")),
        }

    def classify(path, chosen, method_, target_, topk_):
        if not path:
            raise FieldError("image", "upload an image first")
        if not chosen:
            raise FieldError("version", "choose at least one version")
        if len(chosen) > MAX_VERSIONS:
            raise FieldError("version", f"choose at most {MAX_VERSIONS} versions")
        payload = {"image": encode_file(path), "method": method_, "topk": topk_,
                   "target": None if target_ in (None, PREDICTED) else target_}
        updates = {}
        for i, (col, title, table, overlay, raw) in enumerate(columns):
            if i >= len(chosen):
                updates[col] = gr.update(visible=False)
                continue
            result = client.predict(MODEL, payload, version=chosen[i])
            top, cam = result["predictions"][0], result["cam"]
            over = png(cam["overlay"])
            updates.update({
                col: gr.update(visible=True),
                title: f"### {MODEL} {chosen[i]}: **{top['label']}** ({top['probability']:.1%})\n"
                       f"CAM of class {cam['label']} ({cam['method']})",
                table: [[p["index"], p["label"], round(p["probability"], 4)] for p in result["predictions"]],
                overlay: over,
                raw: map_image(cam["map"], over.size),
            })
        yield updates

    demo.load(fields.guarded(load), outputs=[versions, method, target, topk, *fields.outputs])
    run.click(fields.guarded(classify), inputs=[image, versions, method, target, topk],
              outputs=[*[c for column in columns for c in column], *fields.outputs])
