"""The `cam` model's request: every field with its default, limits and documentation, which
fields split a batch, and the CAM methods it offers. handlers/cam.py and docs/api/cam.schema.json
read it. A new CAM method is one entry in GRAD_CAM_METHODS (any pytorch_grad_cam class)."""
from __future__ import annotations

from typing import Annotated, Literal

from PIL import Image
from pydantic import Field, PrivateAttr, ValidationInfo, model_validator
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)

from handlers.core.images import decode_image
from handlers.core.request import BATCHED, Base64Image, ConfigMax, RequestModel

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


class CamRequest(RequestModel):
    """`POST /predictions/cam` (JSON; the raw image as the body takes the defaults), also
    `POST /explanations/cam`: top-k classes and the class activation map of one class."""

    image: Base64Image
    """The image to classify (required in JSON); transparent pixels become the background the model was trained on."""
    topk: Annotated[int, Field(ge=1), ConfigMax("num_classes")] = 5
    """How many classes to return, most probable first (at most the number of classes)."""
    target: Annotated[int | None, Field(ge=0), ConfigMax("max_target")] = None
    """Class index whose activation map to draw; null = the predicted class."""
    method: Annotated[Literal[METHODS], BATCHED] = FAST_METHOD
    """CAM method: 'gradcam' from the classifying forward pass (no backward pass), the others from pytorch-grad-cam."""

    _image: Image.Image | None = PrivateAttr(None)

    @property
    def decoded(self) -> Image.Image:
        return self._image

    @model_validator(mode="after")
    def _decode(self, info: ValidationInfo):
        ctx = info.context
        self._image = decode_image(self.image, ctx["image_field"], ctx["max_pixels"], mode=ctx["mode"],
                                   background=ctx["background"])
        return self
