"""Reading a structured config: schema defaults <- a YAML file <- ``key=value`` overrides -> a dataclass.

Every command's config (training, serving, sweeps, workloads) is read here, so each one rejects an unknown
key or a wrong type the same way: a ``ConfigError`` naming the key path and the value, before Ray starts.
What values are possible is each schema's own business (``config.validate``, ``serve_config``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; the message names the key path and the value."""


def bad(key: str, value: Any, why: str) -> NoReturn:
    """Raise the ``ConfigError`` every check raises: ``key=value: why``."""
    raise ConfigError(f"{key}={value!r}: {why}")


def positive(key: str, value: float | None) -> None:
    if value is None or value <= 0:
        bad(key, value, "must be > 0")


def non_negative(key: str, value: float | None) -> None:
    if value is None or value < 0:
        bad(key, value, "must be >= 0")


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    return key.strip().lstrip("+"), value


def merge_structured(schema: type, path: str | os.PathLike | None = None, overrides=(), *,
                     aliases: dict[str, str] | None = None, extra: dict | None = None) -> Any:
    """Schema defaults <- YAML file <- ``key=value`` overrides <- ``extra`` -> a dataclass instance.

    The one place every command's config is read; errors are ``ConfigError`` naming the key path."""
    layers = [OmegaConf.structured(schema)]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # YAML syntax errors
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    dotlist = []
    for item in overrides:
        key, value = _split_override(item)
        dotlist.append(f"{(aliases or {}).get(key, key)}={value}")
    try:
        if dotlist:
            layers.append(OmegaConf.from_dotlist(dotlist))
        if extra:
            layers.append(OmegaConf.create(extra))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        where = next(filter(None, (_value_over_section(layers[0], layer) for layer in layers[1:])), None)
        raise ConfigError(where or describe_error(exc)) from None


def _value_over_section(schema, layer, prefix: str = "") -> str | None:
    """``key=value: ...`` for a plain value given where the schema has a section (OmegaConf's merge error
    names neither), e.g. ``rollout.weight_sync=collective``."""
    if not OmegaConf.is_dict(layer) or not OmegaConf.is_dict(schema):
        return None
    for key in layer:
        if key not in schema:
            continue
        node, given = schema._get_node(key), layer._get_node(key)
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(given):
            found = _value_over_section(node, given, f"{path}.")
            if found:
                return found
        elif OmegaConf.is_dict(node) and OmegaConf.get_type(node) not in (dict, None):
            return f"{path}={given._value()!r}: a section, not a value; set its keys ({', '.join(f'{path}.{k}' for k in node)})"
    return None


def describe_error(exc: OmegaConfBaseException) -> str:
    """OmegaConf's error as ``key: what`` (its first line), a missing value said plainly."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    if "Missing mandatory value" in msg:
        return f"{key}: missing (required value not set)"
    if key:
        return f"{key}: {msg}"
    return msg
