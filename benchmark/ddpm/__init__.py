"""Unconditional DDPMs: loading, sampling into the store, training with planted duplicates."""
