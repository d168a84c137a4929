"""The thin TorchServe adapter: TorchServe's batch and context in, the core's replies out."""
