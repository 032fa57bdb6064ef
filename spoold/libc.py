"""The few libc calls Python does not expose (renameat2, syncfs, sync_file_range), loaded on first use: ctypes
costs start-up, and a `spoold submit` needs none of them."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

_ARGTYPES = {
    "renameat2": ("c_int", "c_char_p", "c_int", "c_char_p", "c_uint"),
    "syncfs": ("c_int",),
    "sync_file_range": ("c_int", "c_int64", "c_int64", "c_uint"),
}


@functools.cache
def function(name: str) -> Any:
    """A libc function by name, typed for how spoold calls it; None where there is none (not Linux, old libc)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in _ARGTYPES[name]]
    return fn


def last_errno() -> int:
    """The errno the last call through `function` left (ctypes keeps a private copy of it)."""
    import ctypes

    return ctypes.get_errno()


def error(path: str | os.PathLike[str]) -> OSError:
    """The OSError for the errno the last call through `function` left."""
    err = last_errno()
    return OSError(err, os.strerror(err), os.fspath(path))
