"""be-bench: memorization detection, localization and mitigation for diffusion models.

The library is free of Hydra: plain functions and dataclasses. Runners in ``runners/`` compose configs and call it.
"""
