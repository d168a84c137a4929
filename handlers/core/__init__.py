"""The engine-neutral serving core: requests, errors, images, batching, the time budget, the
static / streaming / step-level loops and the one place that writes answers. It imports no
TorchServe module (handlers/adapter/ does), so a model runs under any server that can hand it
a batch of requests."""
