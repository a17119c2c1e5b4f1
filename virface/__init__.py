"""VirFace: face recognition enhanced with unlabeled shallow data (CVPR 2021), in PyTorch."""

__version__ = "0.1.0"
