"""The built-in influence methods, one module each; importing this package registers them.

Adding a method is one new module here that calls `registry.register(InfluenceMethod(...))`, and its
name in `BUILTIN` (their order is the order of `METHODS`, the default first). Code outside the
package (a test, a plug-in) can register a method the same way without touching this package.
"""

from __future__ import annotations

import importlib

from audit.influence import registry

BUILTIN = ("ekfac", "kfac", "arnoldi", "exact", "tracin", "graddot", "gradcos")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")

# Snapshots of the built-in methods, taken at import so that they are plain tuples (flows/settings.py
# derives its choices from them at import); `registry.names()` also lists methods registered later.
METHODS = tuple(m.name for m in registry.methods() if m.name in BUILTIN)
NEEDS_CHECKPOINTS = tuple(m.name for m in registry.methods() if m.name in BUILTIN and m.needs_checkpoints)
NO_SELF_INFLUENCE = tuple(m.name for m in registry.methods() if m.name in BUILTIN and not m.self_influence)
