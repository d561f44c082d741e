"""rayssl: distributed self-supervised pretraining by clustering, on Ray."""

__version__ = "0.1.0"


def load_backbone(checkpoint: str, endpoint_url: str | None = None, region: str | None = None):
    """``(backbone, preprocess)`` of a rayssl checkpoint: a plain torch module and its
    torchvision v2 preprocessing (see ``rayssl.eval.backbone.load_backbone``)."""
    from rayssl.eval.backbone import load_backbone as load

    return load(checkpoint, endpoint_url, region)
