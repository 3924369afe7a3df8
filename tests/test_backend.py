"""The compute backend (`cosyvoice2/backend.py`): chosen once, held by the model, active
during its calls and in the threads they hand work to, and in nothing else."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from cosyvoice2 import backend, branches
from cosyvoice2 import ops as shared_ops
from cosyvoice2.flow import ops as flow_ops


def test_routes_are_what_they_say() -> None:
    composed = backend.choose("composed")
    assert composed == backend.Backend() and composed.route == "composed"
    assert not composed.conv_matmuls and not composed.branch_threads
    plain = backend.choose("plain")
    assert plain.route == "plain" and plain.extension is None and plain.row_kernels is not None
    assert plain.conv_matmuls
    if backend.load_extension() is not None:
        assert backend.choose().route == backend.choose("extension").route == "extension"
        assert backend.choose("extension").row_kernels is None  # numba only without it
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        backend.choose("fast")


def test_missing_parts_are_an_error_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cosyvoice2_kernels", None)  # import raises
    monkeypatch.setattr(backend, "_extension", None)
    monkeypatch.setattr(backend, "_tried_extension", False)
    with pytest.raises(ValueError, match="route 'extension'"):
        backend.choose("extension")
    assert backend.choose().route == "plain"
    monkeypatch.setenv("COSYVOICE2_FLOW_KERNELS", "0")
    with pytest.raises(ValueError, match="route 'plain'"):
        backend.choose("plain")
    assert backend.choose().route == "composed"


def test_operations_read_the_active_backend() -> None:
    default = backend.current()
    with backend.active(backend.choose("composed")):
        assert flow_ops.cpu_extension() is None and not flow_ops.use_cpu_kernels()
        assert not shared_ops.fast_paths_enabled() and not branches.enabled()
        with backend.active(dataclasses.replace(backend.current(), conv_matmuls=True)):
            assert shared_ops.fast_paths_enabled()
        assert not shared_ops.fast_paths_enabled()
    assert backend.current() is default


def test_a_generator_runs_on_its_backend_and_leaks_nothing() -> None:
    composed = backend.choose("composed")
    outside = backend.current()
    assert outside != composed

    def steps():
        for i in range(3):
            yield i, backend.current().route

    seen = []
    for i, route in backend.iterate(composed, steps()):
        seen.append(route)
        assert backend.current() == outside, f"backend leaked to the caller after item {i}"
    assert seen == ["composed"] * 3


def test_branch_threads_share_the_callers_backend() -> None:
    threaded = dataclasses.replace(backend.choose("composed"), branch_threads=True)
    assert backend.current() != threaded
    with backend.active(threaded):
        seen = branches.map_branches(lambda i: (mx.array(i), backend.current()), [[0], [1]])
    assert [s[1] for s in seen] == [threaded, threaded]


def test_the_model_holds_its_backend(mlx_tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load(route=...)` chooses once; the model's calls run on it whatever is active outside."""
    import numpy as np

    from cosyvoice2.frontend import speech_tokenizer
    from cosyvoice2.model import CosyVoice2

    model = CosyVoice2.load(mlx_tiny_dir, route="composed")
    assert model.backend.route == model.meta["backend"] == "composed"
    seen = []
    real = speech_tokenizer.speech_tokens

    def spy(*a, **k):
        seen.append(backend.current().route)
        return real(*a, **k)

    monkeypatch.setattr(speech_tokenizer, "speech_tokens", spy)
    with backend.active(backend.choose("plain")):
        model.speech_tokens(np.zeros(16000, dtype=np.float32))
    assert seen == ["composed"]
    assert model.backend is not backend.current()


def test_closing_early_closes_the_generator_on_its_backend() -> None:
    composed = backend.choose("composed")
    closed = []

    def steps():
        try:
            yield 1
            yield 2
        finally:
            closed.append(backend.current().route)

    items = backend.iterate(composed, steps())
    assert next(items) == 1
    items.close()
    assert closed == ["composed"]
