"""TorchServe's entry module for the `cam` model (archive.sh passes it as --handler): TorchServe's
loader takes the one class defined here, which joins the model to the TorchServe adapter."""
from handlers.adapter.torchserve import TorchServeHandler
from handlers.cam.model import CamModel


class CamHandler(TorchServeHandler):
    model_type = CamModel
