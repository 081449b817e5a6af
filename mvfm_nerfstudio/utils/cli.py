"""One wrapper for every console script: a user error is one clear line (plus a hint) and exit status 2.

A user error is an input the user can fix: :data:`USER_ERRORS` (``ValueError`` and its kin: bad scenes, checkpoints
that do not fit, unknown backbones, run folders in the way; unavailable weights; missing files; diverged training).
Its traceback is noise, so only the message is printed, on stderr. ``--debug`` (anywhere on the command line, or
``MVFM_DEBUG=1``) shows the full traceback instead; unexpected errors (bugs) always show it.

Usage, on a console script's ``entrypoint(argv=None)``::

    @cli_entrypoint("mvfm-train")
    def entrypoint(argv=None): ...      # receives argv without --debug
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, List, Optional, TypeVar

from ..errors import TrainingDivergedError, WeightsUnavailableError

__all__ = ["USER_ERRORS", "cli_entrypoint", "user_error_message"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, WeightsUnavailableError,
               TrainingDivergedError)
"""Exception types reported without a traceback (their messages name the input and the fix)."""

T = TypeVar("T")


def user_error_message(prog: str, err: BaseException) -> str:
    """``<prog>: error: <message>`` plus a hint line."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # KeyError's str() adds quotes
    return (f"{prog}: error: {text}\n"
            f"hint: fix the input named above; rerun with --debug for the full traceback")


def cli_entrypoint(prog: str) -> Callable[[Callable[[Optional[List[str]]], T]], Callable[[Optional[List[str]]], T]]:
    """Decorate ``entrypoint(argv)``: strip ``--debug``, report user errors in one line and exit 2."""

    def wrap(fn: Callable[[Optional[List[str]]], T]) -> Callable[[Optional[List[str]]], T]:
        @functools.wraps(fn)
        def entrypoint(argv: Optional[List[str]] = None) -> T:
            args = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in args or os.environ.get("MVFM_DEBUG", "") not in ("", "0")
            args = [a for a in args if a != "--debug"]
            try:
                return fn(args)
            except USER_ERRORS as err:
                if debug:
                    raise
                print(user_error_message(prog, err), file=sys.stderr)
                raise SystemExit(2) from None

        entrypoint.mvfm_cli = prog  # marks wrapped console scripts (tests check every one is)
        return entrypoint

    return wrap
