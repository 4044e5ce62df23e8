"""The built-in model kinds, one module each; importing this package registers them.

Adding a kind is one new module here that subclasses `ModelKind` and calls `register` with it,
and its name in `BUILTIN`. Code outside the package (a test, a plug-in) can register a kind the
same way without touching this package.
"""

from __future__ import annotations

import importlib

from registry_hooks.model_kinds.registry import (
    DEFAULT_KIND,
    KIND_PARAM,
    ModelKind,
    Registration,
    find,
    kind_from_params,
    names,
    register,
)

BUILTIN = ("pytorch", "torchvision", "transformers")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

from registry_hooks.model_kinds.pytorch import PyTorchModule  # noqa: E402
from registry_hooks.model_kinds.torchvision import TorchvisionModel  # noqa: E402
from registry_hooks.model_kinds.transformers import TransformersModel  # noqa: E402

__all__ = ["BUILTIN", "DEFAULT_KIND", "KIND_PARAM", "ModelKind", "PyTorchModule", "Registration", "TorchvisionModel",
           "TransformersModel", "find", "kind_from_params", "names", "register"]
