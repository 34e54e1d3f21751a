"""Model families (Gemma 3, Gemma 4, Gemma 3n): the one place that knows how they differ.

Stages ask `family_of(config)` / `family_of_processor(processor)` / `get_family(name)` for a
`Family` and call its hooks; none of them compares family names.
"""

from __future__ import annotations

from .base import LORA_TARGET_NAMES, Family, FamilyError
from .gemma3 import Gemma3
from .gemma3n import Gemma3n
from .gemma4 import Gemma4

FAMILIES: dict[str, Family] = {f.name: f for f in (Gemma3(), Gemma4(), Gemma3n())}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}

__all__ = ["FAMILIES", "LORA_TARGET_NAMES", "Family", "FamilyError", "family_of", "family_of_processor", "get_family"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r} (one of {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of(config_or_type) -> Family:
    """The family of a model config (or its model_type string)."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        supported = ", ".join(f"{f.model_type} ({f.display})" for f in FAMILIES.values())
        raise FamilyError(f"model_type {model_type!r} is not a supported family (supported: {supported})")
    return _BY_MODEL_TYPE[model_type]


def family_of_processor(processor) -> Family:
    """The family of a loaded processor, from its class (or a base class: Gemma 4's image-text one)."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    for family in FAMILIES.values():
        if family.processor_class in names:
            return family
    raise FamilyError(f"processor {type(processor).__name__} belongs to no supported family ({', '.join(FAMILIES)})")
