"""The `cam` model: a torchvision classifier that returns its top-k classes
and a class activation map (CAM) of the target class, as a PNG overlay and as a coarse 2-D map.

The default method ("gradcam") costs no backward pass: for a ResNet head (global average pooling
followed by one linear layer) the Grad-CAM channel weights are the final layer's weights divided
by the map area, so after min-max normalisation Grad-CAM equals the classic CAM of Zhou et al.
computed from the same forward pass that classifies. Other methods use the `grad-cam` package.

`quantize: int8` in the target yaml runs that forward pass in int8 (handlers/cam/quantize.py):
the trunk quantized, the head float, the CAM from the dequantized features with the same formula.
The methods that need gradients run on the float model, per request.
"""
from __future__ import annotations

import logging
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision.models.feature_extraction import create_feature_extractor

from handlers.cam import classifier, quantize
from handlers.cam.request import FAST_METHOD, GRAD_CAM_METHODS, METHODS, CamRequest
from handlers.core.batch import PNG_TYPE, Group, Outcome, Pending
from handlers.core.bodies import request_body
from handlers.core.images import b64_png, encode_png
from handlers.core.model import ServedModel

OVERLAY_IMAGE_WEIGHT = 0.5  # the overlay is half picture, half JET heatmap
# How the overlay PNG is compressed: writing it was most of an int8 request's time. zlib level 1
# wrote the demo's overlays 3x faster than PIL's default 6 (22% larger), and the run-length
# strategy a further 1.15x faster and 4% smaller; the pixels are the same.
OVERLAY_PNG = {"compress_level": 1, "strategy": zlib.Z_RLE}

logger = logging.getLogger(__name__)



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


class CamModel(ServedModel):
    """Top-k classification plus a class activation map, batched."""

    request_type = CamRequest

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_weights(self.weights)
        self.bind_request({"num_classes": self.num_classes, "max_target": self.num_classes - 1})
        logger.info("cam: %s with %d classes on %s (%s)", self.arch, self.num_classes, self.device, self.dtype)

    def load_weights(self, wdir: str) -> None:
        cfg = classifier.read_config(wdir)
        self.arch = cfg["arch"]
        self.labels = list(cfg["labels"])
        self.num_classes = int(cfg["num_classes"])
        self.net = classifier.load_model(wdir, cfg).to(self.device, self.dtype)
        self.target_layer = cfg["target_layer"]
        self.classifier = self.net.get_submodule(cfg["classifier_layer"])
        self.extractor = create_feature_extractor(
            self.net, return_nodes={self.target_layer: "features", cfg["classifier_layer"]: "logits"}
        )
        with torch.inference_mode():
            probe = torch.zeros(1, 3, int(cfg["input_size"]), int(cfg["input_size"]), device=self.device, dtype=self.dtype)
            self.map_size = tuple(self.extractor(probe)["features"].shape[-2:])
        self.grayscale = bool(cfg["grayscale"])
        self.background = cfg["background"]
        self.crop = classifier.crop_transform(cfg)
        self.to_tensor = classifier.tensor_transform(cfg)
        self.trunk = self.quantized_trunk(wdir) if self.config.get("quantize") is not None else None

    def quantized_trunk(self, wdir: str):
        """The int8 trunk (`quantize: int8`, `quantized_engine`), calibrated on the weights
        directory's calibration set, preprocessed as requests are."""
        if self.config["quantize"] != "int8":
            raise ValueError(f"cam: quantize must be int8 or null, got {self.config['quantize']!r}")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("cam: quantize: int8 runs on the CPU, around float32 (deviceType cpu, dtype_cpu float32)")
        _, batch = self.preprocess(quantize.calibration_images(wdir))
        return quantize.quantized_trunk(self.net, self.target_layer, self.config["quantized_engine"], batch)

    def preprocess(self, images: list[Image.Image]) -> tuple[list[Image.Image], torch.Tensor]:
        """Each image as the model sees it (RGB, cropped: the overlay is drawn on it) and the batch
        tensor of them: the one preprocessing of requests, calibration and benchmarks."""
        shown = [self.crop(img.convert("RGB")) for img in images]
        return shown, torch.stack([self.to_tensor(img) for img in shown])

    @property
    def precision(self) -> str:
        """What the fast path computes in: 'int8 (<engine>)' or the float dtype."""
        if self.trunk is not None:
            return f"int8 ({self.config['quantized_engine']})"
        return str(self.dtype).removeprefix("torch.")

    # preprocess ---------------------------------------------------------------------------
    def parse(self, body) -> CamRequest:
        """A JSON body, or the raw image bytes as the body (every other field at its default)."""
        body = request_body(body)
        ctx = {"max_pixels": int(self.config["max_image_pixels"]), "mode": "L" if self.grayscale else "RGB",
               "background": tuple(self.background)}
        if isinstance(body, dict):
            return self.request.parse(body, {**ctx, "image_field": "image"})
        return self.request.parse({"image": body}, {**ctx, "image_field": "body"})

    def capabilities(self) -> dict:
        return {"methods": list(METHODS), "labels": self.labels, "arch": self.arch, "precision": self.precision}

    # inference ----------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities only, in the configured precision (the cost baseline of the CAM benchmark)."""
        if self.trunk is not None:
            return self.features_and_logits(batch)[1].softmax(dim=1)
        return self.float_probabilities(batch)

    @torch.inference_mode()
    def float_probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.to(self.device, self.dtype)).float().softmax(dim=1)

    def features_and_logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target layer's features and the logits, from one forward pass (int8: the trunk's
        dequantized features through the float head: global average pooling, then the classifier)."""
        if self.trunk is not None:
            features = self.trunk(batch.to(self.device))["features"]
            return features, self.classifier(features.mean(dim=(2, 3)))
        out = self.extractor(batch.to(self.device, self.dtype))
        return out["features"], out["logits"]

    @torch.inference_mode()
    def fast_cam(self, batch: torch.Tensor, targets: list[int | None]):
        """Probabilities and normalised coarse CAMs from ONE forward pass, for the whole batch."""
        features, logits = self.features_and_logits(batch)
        probs = logits.float().softmax(dim=1)
        chosen = torch.tensor(
            [t if t is not None else int(p.argmax()) for t, p in zip(targets, probs)], device=self.device
        )
        weights = self.classifier.weight[chosen].float()  # (B, C)
        maps = torch.einsum("bc,bchw->bhw", weights, features.float()).clamp(min=0)
        return probs, chosen, normalise_maps(maps)

    def library_cam(self, batch: torch.Tensor, targets: list[int | None], method: str):
        """Probabilities and normalised coarse CAMs from pytorch-grad-cam (needs gradients: the
        float model, also under `quantize: int8`)."""
        probs = self.float_probabilities(batch)
        chosen = torch.tensor([t if t is not None else int(p.argmax()) for t, p in zip(targets, probs)])
        layer = self.net.get_submodule(self.target_layer)
        with GRAD_CAM_METHODS[method](model=self.net, target_layers=[layer]) as explainer:
            # The library resizes its maps to this size; asking for the feature resolution
            # yields the coarse maps themselves, upsampled below like the fast path's.
            explainer.get_target_width_height = lambda _input: (self.map_size[1], self.map_size[0])
            coarse = explainer(
                input_tensor=batch.to(self.device, self.dtype),
                targets=[ClassifierOutputTarget(int(t)) for t in chosen],
            )
        return probs, chosen.to(self.device), torch.from_numpy(np.asarray(coarse, dtype=np.float32))

    def run_group(self, group: Group, progress=None) -> list[tuple]:
        """Per image: (the cropped picture the model saw, probabilities, target, coarse map, full map)."""
        shown, batch = self.preprocess(group.per_image("decoded"))
        targets = group.per_image("target")
        if group.shared["method"] == FAST_METHOD:
            probs, chosen, maps = self.fast_cam(batch, targets)
        else:
            probs, chosen, maps = self.library_cam(batch, targets, group.shared["method"])
        full = upsample_maps(maps, tuple(batch.shape[-2:])).cpu().numpy()
        return [(shown[i], probs[i].cpu(), int(chosen[i]), maps[i].cpu(), full[i]) for i in range(len(shown))]

    # postprocess --------------------------------------------------------------------------
    def respond(self, pending: Pending, results: list[tuple]) -> Outcome:
        req = pending.params
        ((shown, probs, target, coarse, full),) = results
        cam = {
            "target": target,
            "label": self.labels[target],
            "method": req.method,
            "map": [[round(float(v), 5) for v in row] for row in coarse],
        }
        if pending.explain:
            return Outcome(response=cam)
        base = np.asarray(shown, dtype=np.float32) / 255.0
        overlay = Image.fromarray(show_cam_on_image(base, full, use_rgb=True, image_weight=OVERLAY_IMAGE_WEIGHT))
        if pending.png:
            return Outcome(response=encode_png(overlay, **OVERLAY_PNG), content_type=PNG_TYPE)
        top = probs.topk(req.topk)
        predictions = [
            {"index": int(i), "label": self.labels[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(top.values, top.indices)
        ]
        cam["overlay"] = b64_png(overlay, **OVERLAY_PNG)
        return Outcome(response={"predictions": predictions, "cam": cam})
