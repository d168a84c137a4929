"""TorchServe's entry module for the `sd15` model (archive.sh passes it as --handler): TorchServe's
loader takes the one class defined here, which joins the model to the TorchServe adapter."""
from handlers.adapter.torchserve import TorchServeHandler
from handlers.sd15.model import Sd15Model


class Sd15Handler(TorchServeHandler):
    model_type = Sd15Model
