"""Localization: BE masks against ground truth, copying of training images."""
