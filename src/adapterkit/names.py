"""The one place that says what an adapter name may be."""

from __future__ import annotations

import re

from .errors import AdapterNameError

BASE = "base"  # in a mixed batch or a server request, the bare base model; never an adapter's name
_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _VALID_NAME.fullmatch(name) is not None and name != BASE


def shown(name: object, limit: int = 80) -> str:
    """``name`` as an error message quotes it: its repr, cut at ``limit`` characters (a hostile
    client's name can be as long as a URL)."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit - 4]}...{text[-1]}"


def check_adapter_name(name: object, kind: str = "adapter") -> str:
    """``name`` if it can name an adapter (and a folder), or a composition (``kind``), else a clear error."""
    if isinstance(name, str) and name == BASE:
        article = "an" if kind[:1] in "aeiou" else "a"
        raise AdapterNameError(
            f"{BASE!r} cannot name {article} {kind}: it stands for the bare base model in mixed batches and requests"
        )
    if not is_valid_name(name):
        raise AdapterNameError(f"invalid {kind} name {shown(name)}: use 1-128 letters, digits, '_' or '-', "
                               "starting with a letter or digit")
    return name
