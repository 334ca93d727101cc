"""Distill language models from a cached teacher: `pipeline cache-teacher`, `pipeline train`, and the
public loss library `pipeline.losses`."""

__version__ = "0.4.0"
