"""The planted-memorization testbed: a small text-to-image model trained here on data whose memorization is known."""
