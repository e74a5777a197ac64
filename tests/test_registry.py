"""The generic registry: strict registration, helpful look-ups."""
from __future__ import annotations

import pytest

from bench.registry import Registry, RegistryError


def test_duplicate_name_raises_and_keeps_first():
    reg: Registry[int] = Registry("widget")
    reg.add("alpha", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("alpha", 2)
    assert reg.get("alpha") == 1


def test_duplicate_through_decorator_raises():
    reg: Registry[object] = Registry("widget")

    @reg.register("f")
    def f():  # pragma: no cover - body unused
        return 1

    with pytest.raises(RegistryError):
        reg.register("f")(lambda: 2)


def test_unknown_name_suggests_close_matches():
    reg: Registry[int] = Registry("task")
    for i, n in enumerate(["rsna-cls", "rsna-ft", "chexpert-cls", "siim-seg"]):
        reg.add(n, i)
    with pytest.raises(RegistryError) as e:
        reg.get("rsna-clss")
    msg = str(e.value)
    assert "unknown task 'rsna-clss'" in msg
    assert "did you mean 'rsna-cls'" in msg
    assert "siim-seg" in msg  # the full list is given too


def test_unknown_name_without_close_match_has_no_hint():
    reg: Registry[int] = Registry("method")
    reg.add("random", 0)
    with pytest.raises(RegistryError) as e:
        reg.get("zzzzzz")
    assert "did you mean" not in str(e.value)
    assert "random" in str(e.value)


def test_invalid_names_and_listing_order():
    reg: Registry[int] = Registry("x")
    for bad in ("", " padded "):
        with pytest.raises(RegistryError):
            reg.add(bad, 0)
    reg.add("b", 2)
    reg.add("a", 1)
    assert reg.names() == ["a", "b"]
    assert list(reg.items()) == [("a", 1), ("b", 2)]
    assert "a" in reg and "c" not in reg and len(reg) == 2
