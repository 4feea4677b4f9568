"""Early-step BE: detection before the last step, and early stopping on it."""
