"""caloman.allocator: the glibc setting that keeps freed memory, its opt-out and its report."""

from __future__ import annotations

import platform

import pytest

from caloman import allocator


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("CALOMAN_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    assert allocator.allocator_setting() == "default"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_glibc_the_setting_is_applied_and_reported(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.delenv("CALOMAN_KEEP_FREED_MEMORY", raising=False)
    assert allocator.keep_freed_memory() is True
    assert "freed blocks kept" in allocator.allocator_setting()
    assert allocator.keep_freed_memory() is True  # idempotent
