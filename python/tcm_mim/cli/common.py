"""What the command-line tools share: user errors as one stderr line with exit status 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from ..errors import RunWarning, UserError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are :class:`UserError` (one line, exit 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        raise UserError(f"{message} (see {self.prog} --help)")


def run(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``; a :class:`UserError` becomes ``<prog>: error: <message>`` on stderr and exit status 2,
    and a :class:`RunWarning` (resume without a checkpoint, a stale lock taken over) ``<prog>: warning: <message>``."""
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RunWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return main(argv)
        except UserError as err:
            message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
