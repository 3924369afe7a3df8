"""The compute backend: which kernels the model's operations run on, chosen once at load.

Three routes, from fastest to most portable:

- `extension`: the CPU with the optional compiled `cosyvoice2_kernels` (panel GEMMs
  over weights packed once, the flow's transformer block and attention as single
  nodes, the speech LM's fused decoder layers); what it does not cover (the flow
  encoder's softmax and SiLU) runs on MLX's ops, as fast there as on numba;
- `plain`: the CPU without the extension: MLX's ops, with the numba row kernels
  (`cosyvoice2.row_kernels`) for the transcendental element-wise work that MLX's CPU
  backend evaluates one scalar call at a time;
- `composed`: MLX's composed ops alone, as on Metal (the only route off the CPU).

On the CPU two more choices go with the route: the matmul formulations of the
dilated and transposed convolutions (`cosyvoice2.ops`; Metal's native kernels are
fast) and running the two CFG branches and HiFT's resblocks on two threads
(`cosyvoice2.branches`).

`choose()` makes the choice from the default device, what is importable and the
environment switches (`cosyvoice2.settings`), once. `CosyVoice2.load` calls it and
holds the result; the model's calls run with it active (`active`), and the
operations read it through `current()`, which falls back to a process default
chosen the same way on first use. Tests select a route by activating another
backend (`choose(route=...)`), not by changing the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import warnings
from collections.abc import Generator, Iterator
from types import ModuleType

import mlx.core as mx

from cosyvoice2 import settings

ROUTES = ("extension", "plain", "composed")


@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernels a model uses (see module doc). Immutable; `dataclasses.replace` derives variants."""

    extension: ModuleType | None = None  # `cosyvoice2_kernels`
    row_kernels: ModuleType | None = None  # `cosyvoice2.row_kernels` (numba)
    conv_matmuls: bool = False  # `cosyvoice2.ops`: matmul formulations of the slow convolutions
    branch_threads: bool = False  # `cosyvoice2.branches`: two-thread CFG branches and resblocks

    @property
    def route(self) -> str:
        if self.extension is not None:
            return "extension"
        return "plain" if self.row_kernels is not None else "composed"

    def describe(self) -> str:
        """A label for results: the extension's variant and threads (e.g. `avx2 x2`), or `off`."""
        k = self.extension
        return f"{k.isa()} x{k.num_threads()}" if k is not None else "off"


_tried_extension = False
_extension: ModuleType | None = None


def load_extension() -> ModuleType | None:
    """The `cosyvoice2_kernels` module, or None when absent, unusable or disabled.

    `COSYVOICE2_KERNELS=0` (or `off`) makes the package behave as if the extension
    were not installed (it is then not even imported). A present but unusable build
    (e.g. built against another MLX version) gives one warning; an absent one is
    silent, since the extension is optional.
    """
    global _tried_extension, _extension
    if not settings.flag("COSYVOICE2_KERNELS"):
        return None
    if not _tried_extension:
        _tried_extension = True
        try:
            import cosyvoice2_kernels as k

            _extension = k
        except ModuleNotFoundError as e:
            if e.name != "cosyvoice2_kernels":
                warnings.warn(f"cosyvoice2_kernels cannot load: {e}", stacklevel=2)
        except ImportError as e:
            warnings.warn(f"cosyvoice2_kernels cannot load: {e}", stacklevel=2)
    return _extension


def load_row_kernels() -> ModuleType | None:
    """The numba row kernels, or None where numba is missing or `COSYVOICE2_FLOW_KERNELS=0`."""
    if not settings.flag("COSYVOICE2_FLOW_KERNELS"):
        return None
    try:
        from cosyvoice2 import row_kernels
    except ImportError:
        return None
    return row_kernels


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def choose(route: str | None = None) -> Backend:
    """The backend for the default device: the fastest route available (or `route`, which
    must be available), with the environment switches applied."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    if mx.default_device() != mx.cpu:
        if route not in (None, "composed"):
            raise ValueError(f"route {route!r} needs the CPU as the default device")
        return Backend()
    if route == "composed":
        return Backend()
    extension = load_extension() if route in (None, "extension") else None
    if route == "extension" and extension is None:
        raise ValueError("route 'extension': cosyvoice2_kernels is not built or is disabled")
    # numba only where it pays: without the extension (docs/PERFORMANCE.md)
    rows = load_row_kernels() if extension is None else None
    if route == "plain" and rows is None:
        raise ValueError("route 'plain': numba is missing or COSYVOICE2_FLOW_KERNELS=0")
    threads = settings.flag("COSYVOICE2_FLOW_BRANCH_THREADS") and _cpus() >= 2
    return Backend(extension, rows, conv_matmuls=True, branch_threads=threads)


_DEFAULT: Backend | None = None
_ACTIVE: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "cosyvoice2_backend", default=None
)


def default() -> Backend:
    """The process default, chosen on first use (`choose()`)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = choose()
    return _DEFAULT


def current() -> Backend:
    """The active backend (`active`), else the process default."""
    return _ACTIVE.get() or default()


@contextlib.contextmanager
def active(backend: Backend) -> Iterator[Backend]:
    """Run the block (in this thread and the threads it hands work to) on `backend`."""
    token = _ACTIVE.set(backend)
    try:
        yield backend
    finally:
        _ACTIVE.reset(token)


def iterate(backend: Backend, items: Generator) -> Generator:
    """Yield from the generator `items`, running each of its steps on `backend`.

    The backend is active only while the generator runs, never in its caller
    between items (a `with active(...)` around a `yield` would leak it there).
    Closing this generator closes `items`, on `backend` too.
    """
    try:
        while True:
            with active(backend):
                try:
                    item = next(items)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        with active(backend):
            items.close()
