"""Customization Studio: DreamBooth-LoRA, B-LoRA, orthogonal adaptation, DECOR and multi-LoRA composition."""

__version__ = "0.1.0"

from .errors import StudioError  # noqa: E402,F401
