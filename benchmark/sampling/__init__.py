"""Sampling with capture, and the one path that samples what the store lacks."""
