"""mlx-lm's Qwen2 model and KV cache (`mlx_lm.models.qwen2`, `.cache`, `.base`) without mlx-lm's package import.

Why: `import mlx_lm.models.qwen2` first runs `mlx_lm/__init__.py`, which imports mlx-lm's
converter, generator and loader, and through them `transformers` (and `torch`, `scipy`,
`sklearn` where installed): seconds of import time and hundreds of MB of resident memory
that a speech call never uses. The model modules themselves import only MLX.

How: when `mlx_lm` is not imported yet, its package module is created from its spec and
registered without running its `__init__`, so its model modules import as usual; the
package's own code runs the first time anything else reads an attribute the package does
not have yet (`mlx_lm.load`, `from mlx_lm import generate`: module `__getattr__`, PEP 562),
so code that uses mlx-lm as a whole sees the complete package. When `mlx_lm` is already
imported, nothing changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what `_module` imports below, for readers and static checks
    import mlx_lm.models.base
    import mlx_lm.models.cache
    import mlx_lm.models.qwen2  # noqa: F401


def _deferred_package(name: str) -> None:
    """Register package `name` with its `__init__` deferred to its first missing attribute."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        importlib.import_module(name)  # not a plain package: import it as usual
        return
    package = importlib.util.module_from_spec(spec)

    def complete(attr: str) -> Any:
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, attr)

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules[name] = package


def _module(name: str) -> ModuleType:
    _deferred_package(name.split(".")[0])
    return importlib.import_module(name)


qwen2 = _module("mlx_lm.models.qwen2")
_cache = _module("mlx_lm.models.cache")
KVCache = _cache.KVCache
make_prompt_cache = _cache.make_prompt_cache
trim_prompt_cache = _cache.trim_prompt_cache
save_prompt_cache = _cache.save_prompt_cache
load_prompt_cache = _cache.load_prompt_cache
scaled_dot_product_attention = _module("mlx_lm.models.base").scaled_dot_product_attention
