"""Reading a scenario file: JSON or YAML text within size, alias and value limits.

A scenario file comes from a user: it is read only up to
:data:`MAX_FILE_BYTES`, YAML aliases are counted (:data:`MAX_ALIASES`) and so
are the values they expand to (:data:`MAX_VALUES`: a "billion laughs" file is
refused), and every refusal is one :class:`NvmriError` line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvmri_bluesky.errors import NvmriError

__all__ = ["MAX_FILE_BYTES", "MAX_VALUES", "MAX_ALIASES", "read_document"]

MAX_FILE_BYTES = 1_000_000
"""Largest scenario file read, bytes."""
MAX_VALUES = 100_000
"""Most values (numbers, strings, list items, keys) a scenario document may hold,
counted as YAML aliases expand them (a 'billion laughs' file is refused)."""
MAX_ALIASES = 100
"""Most YAML aliases (``*name``) in a scenario file."""


def read_document(path: Path) -> Any:
    """The parsed document of a scenario file, within the size, alias and value limits."""
    text = _read_text(path)
    try:
        data = _parse_yaml(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as exc:
        raise NvmriError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise NvmriError(f"{path}: nested too deeply to be a scenario") from None
    except _TooBig as exc:
        raise NvmriError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and its kin: one line
        reason = " ".join(str(exc).split())[:300]
        raise NvmriError(f"{path}: not valid YAML: {reason}") from None
    try:
        _count_values(data, [MAX_VALUES])
    except RecursionError:
        raise NvmriError(f"{path}: nested too deeply to be a scenario") from None
    except _TooBig as exc:
        raise NvmriError(f"{path}: {exc}") from None
    return data


class _TooBig(Exception):
    """A scenario document beyond the limits."""


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise NvmriError(f"{path}: {size} bytes; a scenario file has at most "
                             f"{MAX_FILE_BYTES}")
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise NvmriError(f"cannot read scenario file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise NvmriError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with at most :data:`MAX_ALIASES` aliases."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > MAX_ALIASES:
                    raise _TooBig(f"more than {MAX_ALIASES} YAML aliases")
            return super().compose_node(parent, index)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _count_values(data: Any, budget: list[int]) -> None:
    """Count the values of ``data`` as if aliases were copies; raise past the budget."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig(f"more than {MAX_VALUES} values (YAML aliases expanding?)")
    if isinstance(data, Mapping):
        for key, value in data.items():
            _count_values(key, budget)
            _count_values(value, budget)
    elif isinstance(data, list | tuple):
        for value in data:
            _count_values(value, budget)
