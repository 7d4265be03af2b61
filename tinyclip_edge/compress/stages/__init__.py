"""Stage methods (inherit, prune, scratch, dclip-meta): each declares its phases; the runner walks them."""

from .base import Carry, Phase, StageContext, StageMethod
from .registry import METHODS, get_method

__all__ = ["METHODS", "Carry", "Phase", "StageContext", "StageMethod", "get_method"]
