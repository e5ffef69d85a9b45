"""Local path or Hub id? One rule for every argument that accepts both (models, configs, latency tables).

A name that *looks like a local path* — it starts with ``.``, ``/`` or ``~``, holds more than one ``/`` (a Hub
id holds at most one), holds a backslash, or its first folder exists here — is never sent to the Hub when it
does not exist: the error says which file or folder is missing, instead of an "invalid repo id" or a network
error. Anything else (``org/name``, ``name``) may be a Hub id. Standard library only.
"""

from __future__ import annotations

import os


def looks_like_local_path(name) -> bool:
    """Whether ``name`` can only mean a local file or folder (see the module doc)."""
    if isinstance(name, os.PathLike):
        return True
    if not isinstance(name, str) or not name:
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(os.path.expanduser(first))  # "tables/t.json" with ./tables present


def deepest_existing_parent(path: str) -> str | None:
    """The longest leading part of ``path`` that exists (what the user typed correctly), or None."""
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        if os.path.dirname(parent) == parent:
            return None
        parent = os.path.dirname(parent)
    return parent or None


def missing_path_error(name, what: str) -> FileNotFoundError | None:
    """A FileNotFoundError naming the missing file/folder when ``name`` looks like a local path that does not
    exist; None when it exists or may be a Hub id. ``what``: e.g. "model", "latency table"."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not looks_like_local_path(text) or os.path.exists(os.path.expanduser(text)):
        return None
    parent = deepest_existing_parent(text)
    where = f" ({parent} exists, the rest of the path does not)" if parent and parent != os.sep else ""
    return FileNotFoundError(
        f"{what} {text!r} does not exist: no such file or folder{where}. It is a local path, so it was not looked "
        "up on the Hugging Face Hub; check the spelling (or give a Hub id such as 'org/name')"
    )


def check_local_path(name, what: str) -> None:
    """Raise :func:`missing_path_error` if it applies."""
    error = missing_path_error(name, what)
    if error is not None:
        raise error


__all__ = ["check_local_path", "deepest_existing_parent", "looks_like_local_path", "missing_path_error"]
