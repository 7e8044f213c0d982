"""Registry of training recipes: method name -> recipe class (each has ``config_cls``)."""

from __future__ import annotations

from studio.errors import InputError

from .blora import BLoraRecipe
from .dreambooth import DreamBoothRecipe
from .orthogonal import OrthogonalRecipe

RECIPES: dict[str, type] = {"dreambooth": DreamBoothRecipe, "blora": BLoraRecipe, "orthogonal": OrthogonalRecipe}


def get_recipe(method: str):
    if method not in RECIPES:
        raise InputError(f"Unknown training method {method!r}: choose one of {', '.join(sorted(RECIPES))}.")
    return RECIPES[method]()
