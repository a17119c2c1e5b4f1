"""Face backbones, built by name: ``build_backbone(name, feat_len, input_size)``.

Every backbone maps ``(B, 3, input_size, input_size)`` float images to ``(B, feat_len)``
embeddings (not normalised, no classifier); input_size must be a multiple of 16. Names:
``resnet18`` .. ``resnet152`` (the VirFace reference's face ResNet), ``iresnet18`` ..
``iresnet100`` (insightface), ``mobilefacenet`` and the CPU-sized ``mobilefacenet_s``, or
``"module.path:callable"`` for a user architecture.
"""

from virface.backbones.registry import (
    build_backbone,
    check_input_size,
    list_backbones,
    register_backbone,
)

# Imported for their @register_backbone side effect (they import the registry module above).
from virface.backbones import face_resnet, iresnet, mobilefacenet  # noqa: F401

__all__ = ["build_backbone", "check_input_size", "list_backbones", "register_backbone"]
