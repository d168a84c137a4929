"""The web playground (`make ui`): a Gradio app over the TorchServe clients in clients/."""
