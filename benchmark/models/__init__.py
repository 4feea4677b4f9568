"""Text-to-image models: loading a pipeline folder, the tiny in-process models, tokenizers."""

# the modules that register model builders (benchmark.registry.PACKAGES imports this package)
from benchmark.models import text_to_image  # noqa: F401
