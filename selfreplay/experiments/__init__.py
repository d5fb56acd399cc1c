"""Experiments built from the library's parts: the demo, method comparisons, figures."""
