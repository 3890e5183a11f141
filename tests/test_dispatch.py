"""Backend selection: forcing, auto, and the logged-once fallback."""

import logging

import pytest
import torch
from fastmlr.kernels import _dispatch

from fastmlr import kernels


def test_resolve_backend_choices(monkeypatch) -> None:
    x = torch.zeros(2)
    assert kernels.resolve_backend("op", "torch", x) == "torch"
    assert kernels.resolve_backend("op", "auto", x) == "torch"  # CPU tensor: auto never picks Triton
    with kernels.use_backend("torch"):
        assert kernels.resolve_backend("op", "triton", x) == "torch"
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: True)
    assert kernels.resolve_backend("op", "triton", x) == "triton"
    with kernels.use_backend("triton"):
        assert kernels.resolve_backend("op", "auto", x) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("op", "cuda", x)
    with pytest.raises(ValueError, match="use_backend takes"):
        with kernels.use_backend("auto"):
            pass


def test_fallback_is_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    x = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="fastmlr.kernels"):
        assert kernels.resolve_backend("some_op", "triton", x) == "torch"
        assert kernels.resolve_backend("some_op", "triton", x) == "torch"
    records = [r for r in caplog.records if "some_op" in r.getMessage()]
    assert len(records) == 1 and "falling back to torch" in records[0].getMessage()
