"""The built-in modalities, one module each; importing this package registers them.

Adding a modality is one new module here that subclasses `Modality` and calls `register` with it,
and its name in `BUILTIN`. Code outside the package (a test, a plug-in) can register one the same
way without touching this package.
"""

from __future__ import annotations

import importlib

from audit.modalities.registry import (
    DEFAULT_MODALITY,
    MODALITY_PARAM,
    InputCheck,
    Modality,
    Registration,
    find,
    modality_from_params,
    names,
    register,
)

BUILTIN = ("pixels", "text", "image")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

from audit.modalities.image import Image  # noqa: E402
from audit.modalities.pixels import Pixels  # noqa: E402
from audit.modalities.text import Text  # noqa: E402

__all__ = ["BUILTIN", "DEFAULT_MODALITY", "MODALITY_PARAM", "Image", "InputCheck", "Modality", "Pixels",
           "Registration", "Text", "find", "modality_from_params", "names", "register"]
