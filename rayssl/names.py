"""The choices the config validates, by name: torch-free, so that loading a config stays light.

``rayssl.objective`` and ``rayssl.models.backbones`` implement these names (tests/test_config.py
checks that theirs are the same).
"""

MODES = ("none", "center", "prior", "sinkhorn")  # objective.mode
TARGET_PRIORS = ("uniform", "powerlaw")  # objective.target_prior
SCOPES = ("global", "local")  # objective.scope
BACKBONES = ("convnet4", "resnet18", "resnet50", "vit_tiny", "vit_small")  # model.backbone
