"""Fault shims for daemon subprocesses, loaded through PYTHONPATH (see `shim_env` in the tests).

$SPOOLD_TEST_DISK names a control file: while it holds `ENOSPC` (disk full) every
staged write into the spool fails; with `EROFS` (read-only) renames fail as well.
$SPOOLD_TEST_CLOCK names a file holding seconds to add to the wall clock (a clock
jump, forwards or backwards); monotonic time is untouched, as on a real machine.
"""

import errno
import os
import time

_DISK = os.environ.get("SPOOLD_TEST_DISK")
_CLOCK = os.environ.get("SPOOLD_TEST_CLOCK")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


if _DISK:
    from spoold import spool

    def _wrap(fn, errnos):
        def wrapped(*args, **kwargs):
            err = getattr(errno, _read(_DISK), None) if _read(_DISK) else None
            if err in errnos:
                raise OSError(err, os.strerror(err), str(getattr(args[0], "root", args[0])))
            return fn(*args, **kwargs)

        return wrapped

    spool._write_tmp = _wrap(spool._write_tmp, (errno.ENOSPC, errno.EROFS))
    spool.rename_noreplace = _wrap(spool.rename_noreplace, (errno.EROFS,))

if _CLOCK:
    _time, _time_ns = time.time, time.time_ns

    def _offset() -> float:
        return float(_read(_CLOCK) or 0)

    time.time = lambda: _time() + _offset()
    time.time_ns = lambda: _time_ns() + int(_offset() * 1e9)
