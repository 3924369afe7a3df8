"""The compute routes our model can take, for running one parity test on each.

- `extension`: the CPU with the optional `cosyvoice2_kernels` extension, no numba (the default
  where it is built). Skips, as a kernel test, where the extension is not built.
- `plain`: the CPU without the extension: MLX's ops plus the numba row kernels,
  what a CPU without a compiler runs.
- `composed`: MLX's composed ops alone, as on Metal: neither the extension nor numba,
  MLX's native convolutions (`cosyvoice2.ops` fast paths off) and no CFG-branch or
  resblock threads (`cosyvoice2.branches` off).

A route is a backend (`cosyvoice2.backend.choose(route=...)`) made active for the
block. The speech LM picks its layers when it is swapped (`kernel_layers.use_kernels`,
for the active backend), so a test that builds our LLM inside `on_route` gets that
route's layers; layers already swapped compute with MLX's ops on a route without
the extension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

ROUTES = ("extension", "plain", "composed")
KERNELS_SKIP = "cosyvoice2_kernels not built"


def extension_built() -> bool:
    from cosyvoice2 import backend

    return backend.load_extension() is not None


@contextlib.contextmanager
def on_route(route: str) -> Iterator[None]:
    """Run the block on `route` (see the module docstring)."""
    from cosyvoice2 import backend, branches
    from cosyvoice2 import ops as shared_ops
    from cosyvoice2.flow import ops

    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    if route == "extension" and not extension_built():
        pytest.skip(KERNELS_SKIP)
    with backend.active(backend.choose(route)):
        assert (ops.cpu_extension() is not None) == (route == "extension")
        if route == "composed":
            assert not ops.use_cpu_kernels() and not shared_ops.fast_paths_enabled()
            assert not branches.enabled()
        yield


@pytest.fixture(params=ROUTES)
def route(request) -> Iterator[str]:
    """Parametrise a test over the three routes; the test body runs on that route."""
    with on_route(request.param):
        yield request.param


def with_backend(**changes) -> contextlib.AbstractContextManager:
    """Run a block on the active backend with `changes` (e.g. `conv_matmuls=False`)."""
    import dataclasses

    from cosyvoice2 import backend

    return backend.active(dataclasses.replace(backend.current(), **changes))
