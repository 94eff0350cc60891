"""What the commands print: one readable ``error:`` line for the errors a user can fix."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

# Errors a user can act on (bad config, path, data, source, cluster); anything else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def run_command(
    body: Callable[[], object],
    codes: Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = (),
) -> int:
    """Run a command's body: its exit code (an int it returns, else 0), or one ``error: ...`` line on
    stderr and the error's code. ``codes`` maps exception types to exit codes, first match wins;
    other user errors exit 2.
    """
    try:
        result = body()
    except USER_ERRORS as e:
        code = next((c for types, c in codes if isinstance(e, types)), 2)
        print(f"error: {e}", file=sys.stderr)
        return code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
