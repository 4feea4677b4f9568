"""Prompt sets: the loaders of published prompt files and the registry's prompt sources."""
