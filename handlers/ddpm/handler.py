"""TorchServe's entry module for the `ddpm` model (archive.sh passes it as --handler): TorchServe's
loader takes the one class defined here, which joins the model to the TorchServe adapter."""
from handlers.adapter.torchserve import TorchServeHandler
from handlers.ddpm.model import DdpmModel


class DdpmHandler(TorchServeHandler):
    model_type = DdpmModel
