"""Makes plain ``lm_eval --model moelora`` work on lm-eval releases that read no entry points.

lm-eval 0.4.x resolves ``--model NAME`` in its own registry only. Releases with plugin discovery
read moelora's ``lm_eval.models`` entry point instead (pyproject.toml), and this module does nothing
there. For the older ones, ``moelora-lm-eval.pth`` (installed beside this file) imports it when
Python starts. It adds one finder to ``sys.meta_path`` that waits for ``lm_eval.api.registry`` to
be imported, then registers ``moelora`` in lm_eval's model registry as a lazy
``"module:Class"`` placeholder. Nothing from moelora, torch or lm_eval is imported at start-up. A
process that never imports lm_eval only pays for this small module and one string comparison per
new import.

Set ``MOELORA_NO_LM_EVAL_PLUGIN=1`` to switch it off. ``moelora-lm-eval`` works either way.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder

MODEL_NAME = "moelora"
MODEL_TARGET = "moelora.lm_eval_model:MoeLoraLM"
REGISTRY_MODULE = "lm_eval.api.registry"
DISABLE_ENV = "MOELORA_NO_LM_EVAL_PLUGIN"


def register(registry_module) -> bool:
    """Register the lazy ``moelora`` placeholder in an imported ``lm_eval.api.registry``.

    Returns whether it registered. It never raises: a failure here must not break lm_eval.
    Releases with entry-point discovery (``load_plugins``) are left to find moelora by themselves.
    """
    try:
        if hasattr(registry_module, "load_plugins"):
            return False
        registry = getattr(registry_module, "model_registry", None)
        if registry is None or MODEL_NAME in registry:
            return False
        registry.register(MODEL_NAME, target=MODEL_TARGET)
        return True
    except Exception:  # an lm_eval whose registry looks different: leave it alone
        return False


class _RegisteringLoader(Loader):
    """The registry module's own loader, plus :func:`register` once the module has run."""

    def __init__(self, inner: Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        register(module)

    def __getattr__(self, name):  # get_source, get_filename, ...: tracebacks and inspect use them
        return getattr(self._inner, name)


class _RegistryFinder(MetaPathFinder):
    """Finds ``lm_eval.api.registry`` as the path finder does and wraps its loader; ignores the rest."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        wrapped = ModuleSpec(spec.name, _RegisteringLoader(spec.loader), origin=spec.origin,
                             is_package=spec.submodule_search_locations is not None)
        wrapped.submodule_search_locations = spec.submodule_search_locations
        wrapped.has_location = spec.has_location
        wrapped.cached = spec.cached
        return wrapped


def install() -> None:
    """Called by the ``.pth`` file at start-up: arm the finder (or register now if lm_eval is loaded)."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
        return
    if not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
