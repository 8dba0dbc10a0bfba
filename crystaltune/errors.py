"""User-facing errors: one clear line, no traceback, non-zero exit."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable


class CrystaltuneError(Exception):
    """An error caused by the user's input (file, config, argument), reported as one line."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point: user errors print `error: ...` and exit 2, Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except CrystaltuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            print(f"error: disk full writing {exc.filename or 'a file'}: free space, then run again", file=sys.stderr)
            return 1
        return int(rc or 0)

    return wrapper


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that says the disk (or the user's quota) is full, from Python or pyarrow."""
    return isinstance(exc, OSError) and (
        exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
    )
