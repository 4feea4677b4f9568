"""Measures: detection metrics with bootstrap intervals, copy similarity and prompt fidelity."""
