"""The exception for a user's mistake, which the command-line tools report as one line (exit 2)."""

from __future__ import annotations


class UserError(ValueError):
    """A wrong argument, config value or input file: ``tcm-pretrain``, ``tcm-eval`` and ``tcm-mask`` print
    its message as one line on stderr and exit 2; any other exception is a bug and keeps its traceback.

    A ``ValueError`` so that library callers catching ``ValueError`` keep working.
    """


class RunWarning(UserWarning):
    """Something the user should know that does not stop the run (a resume without a checkpoint, a stale lock
    taken over, a checkpoint without a digest): the command-line tools print it as ``<tool>: warning: ...``."""
