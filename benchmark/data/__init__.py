"""Prompt sets: the loaders of published prompt files and the registry's prompt sources."""

# the modules that register prompt sources (benchmark.registry.PACKAGES imports this package)
from benchmark.data import prompt_files, prompts  # noqa: F401
