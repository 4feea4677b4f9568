"""Text-to-image models: loading a pipeline folder, the tiny in-process models, tokenizers."""
