"""The compute routes our model can take, for running one parity test on each.

- `extension`: the CPU with the optional `cosyvoice2_kernels` extension (the default
  where it is built). Skips, as a kernel test, where the extension is not built.
- `plain`: the CPU without the extension (`COSYVOICE2_KERNELS=0`): MLX's ops plus
  the numba row kernels, what a CPU without a compiler runs.
- `composed`: MLX's composed ops alone, as on Metal: neither the extension nor numba,
  MLX's native convolutions (`cosyvoice2.ops` fast paths off) and no CFG-branch or
  resblock threads (`cosyvoice2.branches` off).

The speech LM picks its layers at load (`fastlinear.use_kernels`), so a test that
builds our LLM inside `on_route` gets that route's layers; `fastlinear.mlx_ops()`
also makes layers already swapped compute with MLX's ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

ROUTES = ("extension", "plain", "composed")
KERNELS_SKIP = "cosyvoice2_kernels not built"


def extension_built() -> bool:
    from cosyvoice2 import fastlinear

    return fastlinear.kernels_module() is not None


@contextlib.contextmanager
def on_route(route: str) -> Iterator[None]:
    """Run the block on `route` (see the module docstring)."""
    from cosyvoice2 import fastlinear
    from cosyvoice2.flow import ops

    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    if route == "extension":
        if not extension_built():
            pytest.skip(KERNELS_SKIP)
        yield
        return
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv(fastlinear.ENV, "0")
        if route == "composed":
            from cosyvoice2 import ops as shared_ops

            mp.setattr(ops, "_KERNELS", False)
            mp.setenv("COSYVOICE2_FLOW_BRANCH_THREADS", "0")
            mp.setattr(shared_ops, "_FORCE", False)
            assert not ops.use_cpu_kernels() and not shared_ops.fast_paths_enabled()
        assert ops.cpu_extension() is None
        with fastlinear.mlx_ops():
            yield
    finally:
        mp.undo()


@pytest.fixture(params=ROUTES)
def route(request) -> Iterator[str]:
    """Parametrise a test over the three routes; the test body runs on that route."""
    with on_route(request.param):
        yield request.param
