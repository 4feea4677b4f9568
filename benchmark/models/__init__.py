"""Text-to-image models: loading a pipeline folder, the tiny in-process models, tokenizers."""

# the modules that register model builders and families (benchmark.registry.PACKAGES imports this package)
from benchmark.models import pixart, sdxl, text_to_image  # noqa: F401
