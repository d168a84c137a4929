"""TorchServe handler for the `cam` model: a torchvision classifier that returns its top-k classes
and a class activation map (CAM) of the target class, as a PNG overlay and as a coarse 2-D map.

The default method ("gradcam") costs no backward pass: for a ResNet head (global average pooling
followed by one linear layer) the Grad-CAM channel weights are the final layer's weights divided
by the map area, so after min-max normalisation Grad-CAM equals the classic CAM of Zhou et al.
computed from the same forward pass that classifies. Other methods use the `grad-cam` package.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import load_file
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms import v2

from handlers.common import (
    PNG_TYPE,
    BatchedHandler,
    Outcome,
    Param,
    b64_png,
    decode_image,
    encode_png,
    header,
    parse_params,
    request_body,
    wants_png,
)

logger = logging.getLogger(__name__)

FAST_METHOD = "gradcam"
GRAD_CAM_METHODS = {
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
    # The exact pytorch-grad-cam GradCAM, for comparison with the fast path.
    "gradcam-backprop": GradCAM,
}
METHODS = (FAST_METHOD, *GRAD_CAM_METHODS)
DEFAULT_MAX_PIXELS = 16_000_000


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling to [0, 1], the same formula pytorch-grad-cam applies."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(dim=1, keepdim=True).values)
    return flat.view_as(maps)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) in [0, 1]: bilinear with half-pixel centres (as cv2.resize does),
    then normalised again, which is what pytorch-grad-cam returns for one target layer."""
    return normalise_maps(F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


class CamHandler(BatchedHandler):
    """Top-k classification plus a class activation map, batched."""

    def initialize(self, context):
        wdir = self.prepare(context)
        self.load_weights(wdir)
        self.max_pixels = int(self.config.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        self.spec = {
            "image": Param(str),  # base64; required in a JSON body
            "topk": Param(int, min(5, self.num_classes), minimum=1, maximum=self.num_classes),
            "target": Param(int, None, minimum=0, maximum=self.num_classes - 1, nullable=True),
            "method": Param(str, FAST_METHOD, choices=METHODS),
        }
        self.initialized = True
        logger.info("cam: %s with %d classes on %s", self.arch, self.num_classes, self.device)

    def load_weights(self, wdir: str) -> None:
        config_path = os.path.join(wdir, "cam_config.json")
        weights_path = os.path.join(wdir, "model.safetensors")
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"cam: missing weights file {path}")
        with open(config_path) as f:
            cfg = json.load(f)
        self.arch = cfg["arch"]
        self.labels = list(cfg["labels"])
        self.num_classes = int(cfg["num_classes"])
        model = torchvision.models.get_model(self.arch, num_classes=self.num_classes)
        try:
            model.load_state_dict(load_file(weights_path))
        except Exception as exc:
            raise RuntimeError(f"cam: cannot load weights file {weights_path}: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.target_layer = cfg.get("target_layer", "layer4")
        self.classifier = self.model.get_submodule(cfg.get("classifier_layer", "fc"))
        self.extractor = create_feature_extractor(
            self.model, return_nodes={self.target_layer: "features", cfg.get("classifier_layer", "fc"): "logits"}
        )
        with torch.inference_mode():
            probe = torch.zeros(1, 3, int(cfg["input_size"]), int(cfg["input_size"]), device=self.device)
            self.map_size = tuple(self.extractor(probe)["features"].shape[-2:])
        self.grayscale = bool(cfg.get("grayscale", False))
        self.crop = v2.Compose([v2.Resize(int(cfg["resize"])), v2.CenterCrop(int(cfg["input_size"]))])
        self.to_tensor = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]
        )

    # preprocess ---------------------------------------------------------------------------
    def parse(self, row, idx: int) -> dict:
        body = request_body(row)
        if isinstance(body, dict):
            params = parse_params(body, self.spec)
            data, field = params.pop("image"), "image"
        else:
            params = {name: p.default for name, p in self.spec.items() if name != "image"}
            data, field = body, "body"
        image = decode_image(data, field, self.max_pixels, mode="L" if self.grayscale else "RGB")
        shown = self.crop(image.convert("RGB"))
        params.update(
            shown=shown,
            tensor=self.to_tensor(shown),
            explain=header(self.context, idx, "explain") == "True",
            png=wants_png(self.context, idx),
        )
        return params

    def group_key(self, req: dict):
        return req["method"]

    # inference ----------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities only (the cost baseline of the CAM benchmark)."""
        return self.model(batch.to(self.device)).softmax(dim=1)

    @torch.inference_mode()
    def fast_cam(self, batch: torch.Tensor, targets: list[int | None]):
        """Probabilities and normalised coarse CAMs from ONE forward pass, for the whole batch."""
        out = self.extractor(batch.to(self.device))
        probs = out["logits"].float().softmax(dim=1)
        chosen = torch.tensor(
            [t if t is not None else int(p.argmax()) for t, p in zip(targets, probs)], device=self.device
        )
        weights = self.classifier.weight[chosen].float()  # (B, C)
        maps = torch.einsum("bc,bchw->bhw", weights, out["features"].float()).clamp(min=0)
        return probs, chosen, normalise_maps(maps)

    def library_cam(self, batch: torch.Tensor, targets: list[int | None], method: str):
        """Probabilities and normalised coarse CAMs from pytorch-grad-cam (needs gradients)."""
        probs = self.classify(batch)
        chosen = torch.tensor([t if t is not None else int(p.argmax()) for t, p in zip(targets, probs)])
        layer = self.model.get_submodule(self.target_layer)
        with GRAD_CAM_METHODS[method](model=self.model, target_layers=[layer]) as explainer:
            # The library resizes its maps to this size; asking for the feature resolution
            # yields the coarse maps themselves, upsampled below like the fast path's.
            explainer.get_target_width_height = lambda _input: (self.map_size[1], self.map_size[0])
            coarse = explainer(
                input_tensor=batch.to(self.device),
                targets=[ClassifierOutputTarget(int(t)) for t in chosen],
            )
        return probs, chosen.to(self.device), torch.from_numpy(np.asarray(coarse, dtype=np.float32))

    def run_group(self, reqs: list[dict]) -> list[Outcome]:
        batch = torch.stack([r["tensor"] for r in reqs])
        targets = [r["target"] for r in reqs]
        method = reqs[0]["method"]
        if method == FAST_METHOD:
            probs, chosen, maps = self.fast_cam(batch, targets)
        else:
            probs, chosen, maps = self.library_cam(batch, targets, method)
        full = upsample_maps(maps, tuple(batch.shape[-2:])).cpu().numpy()
        return [
            self.respond(req, probs[i].cpu(), int(chosen[i]), maps[i].cpu(), full[i])
            for i, req in enumerate(reqs)
        ]

    # postprocess --------------------------------------------------------------------------
    def respond(self, req: dict, probs: torch.Tensor, target: int, coarse: torch.Tensor, full: np.ndarray):
        cam = {
            "target": target,
            "label": self.labels[target],
            "method": req["method"],
            "map": [[round(float(v), 5) for v in row] for row in coarse],
        }
        if req["explain"]:
            return Outcome(response=cam)
        base = np.asarray(req["shown"], dtype=np.float32) / 255.0
        overlay = Image.fromarray(show_cam_on_image(base, full, use_rgb=True, image_weight=0.5))
        if req["png"]:
            return Outcome(response=encode_png(overlay), content_type=PNG_TYPE)
        top = probs.topk(req["topk"])
        predictions = [
            {"index": int(i), "label": self.labels[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(top.values, top.indices)
        ]
        cam["overlay"] = b64_png(overlay)
        return Outcome(response={"predictions": predictions, "cam": cam})
