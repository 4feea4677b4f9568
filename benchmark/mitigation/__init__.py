"""Mitigation: every inference-time mitigation and the privacy-utility trade-off."""
