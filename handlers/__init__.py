"""TorchServe handlers: one module per model plus the shared `common` module."""
