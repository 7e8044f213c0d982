"""Registry of training recipes: method name -> recipe class (each has ``config_cls``)."""

from __future__ import annotations

from studio.errors import InputError

from .dreambooth import DreamBoothRecipe

RECIPES: dict[str, type] = {"dreambooth": DreamBoothRecipe}
from .blora import BLoraRecipe  # noqa: E402
RECIPES["blora"] = BLoraRecipe
from .orthogonal import OrthogonalRecipe  # noqa: E402
RECIPES["orthogonal"] = OrthogonalRecipe


def get_recipe(method: str):
    if method not in RECIPES:
        raise InputError(f"Unknown training method {method!r}: choose one of {', '.join(sorted(RECIPES))}.")
    return RECIPES[method]()
