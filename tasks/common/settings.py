"""A protocol's settings per preset, with ``--set key=value`` overrides coerced to the default's type."""
from __future__ import annotations

from typing import Any, Mapping

from bench.errors import BenchError


def resolve_settings(defaults: Mapping[str, Any], overrides: tuple[tuple[str, Any], ...] | Mapping[str, Any]) -> dict[str, Any]:
    """Preset settings with ``--set key=value`` overrides, each coerced to the default's type."""
    out = dict(defaults)
    for key, value in (overrides.items() if isinstance(overrides, Mapping) else overrides):
        if key not in out:
            raise BenchError(f"unknown setting {key!r} (settings: {', '.join(sorted(out))})")
        out[key] = _coerce(key, value, out[key])
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    # bool before int: bool is a subclass of int, and "false" must not become int("false")
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("true", "1", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise BenchError(f"setting {key}={value!r}: expected a {type(default).__name__}") from None
    return value
