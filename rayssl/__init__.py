"""rayssl: distributed self-supervised pretraining by clustering, on Ray."""

__version__ = "0.1.0"
