"""Checkpoints that cannot run code and that reveal corruption, and one run per output folder.

* :func:`save` writes atomically (a temporary file in the same folder, fsync, rename), refuses a state
  with non-finite tensors (the last good checkpoint stays), and writes ``<name>.sha256`` beside the
  checkpoint in ``sha256sum`` format (``sha256sum -c checkpoint.pt.sha256`` checks it by hand).
* :func:`load` verifies that digest, then loads with ``torch.load(weights_only=True)``: tensors and
  plain values only, so a checkpoint from elsewhere cannot execute code. Every failure is a
  :class:`CheckpointError` naming the file and what is wrong.
* :class:`RunLock` holds ``<out_dir>/run.lock`` (pid, host, start time) for the length of a run; a
  second run on the same folder is refused, a lock left by a dead process on this host is taken over.
* :func:`remove_orphan_temps` deletes the temporary files of a save that was killed midway.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import pickle
import re
import socket
import warnings
import zipfile
from collections.abc import Iterator

import torch

from ..errors import RunWarning, UserError

DIGEST_SUFFIX = ".sha256"
LOCK_NAME = "run.lock"
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")  # what save() names its temporary files: .<name>.<pid>.tmp


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe to load, not a tcm-pretrain checkpoint, or unsafe to write."""


class RunLockedError(UserError):
    """Another run holds the output folder."""


def digest_path(path: str | pathlib.Path) -> pathlib.Path:
    """Where the SHA-256 of checkpoint ``path`` is kept: ``<path>.sha256``."""
    path = pathlib.Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _first_nonfinite(state: dict) -> str | None:
    for name, t in _tensors(state):
        # one host sync per tensor: checkpoints are rare, and the file write syncs everything anyway
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def _write_atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(state: dict, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``state`` (tensors and plain values) to ``path`` atomically, with its digest beside it.

    Raises :class:`CheckpointError` without touching ``path`` when a floating tensor of ``state``
    (weights, optimiser moments) holds NaN or inf: the last good checkpoint stays.
    """
    path = pathlib.Path(path)
    bad = _first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} not written: tensor {bad!r} has NaN or inf values; the "
                              f"previous checkpoint (if any) is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: torch.save(state, f))
    # The digest follows the checkpoint: a crash between the two renames leaves a mismatch that
    # load() reports (with how to accept the file), never a silently unverified checkpoint.
    line = f"{_sha256(path)}  {path.name}\n"
    _write_atomic(digest_path(path), lambda f: f.write(line.encode()))
    return path


def verify(path: str | pathlib.Path) -> bool:
    """Check ``path`` against its digest file: True if they agree, False if there is no digest file.

    Raises :class:`CheckpointError` when they disagree (a partial copy, flipped bytes, an edited file).
    """
    path = pathlib.Path(path)
    dpath = digest_path(path)
    if not dpath.exists():
        return False
    recorded = dpath.read_text().split()
    if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
        raise CheckpointError(f"checkpoint {path}: its digest file {dpath} does not hold a SHA-256")
    actual = _sha256(path)
    if actual != recorded[0]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 {actual[:12]}... differs from "
                              f"{recorded[0][:12]}... recorded in {dpath.name} (changed bytes or an incomplete "
                              f"copy); restore the file, or delete {dpath.name} if you trust it as it is")
    return True


def load(path: str | pathlib.Path, *, required: tuple[str, ...] = ("model", "config"),
         map_location: str | torch.device = "cpu") -> dict:
    """The state dict in checkpoint ``path``, verified against its digest and loaded with ``weights_only=True``.

    ``required``: top-level keys the caller needs. A checkpoint without a digest file (written before
    digests existed) loads with a warning. Raises :class:`CheckpointError` naming ``path`` and the problem.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if not verify(path):
        warnings.warn(f"checkpoint {path} has no digest file {digest_path(path).name}: loaded without an "
                      f"integrity check", RunWarning, stacklevel=2)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise CheckpointError(f"checkpoint {path} refused: it contains a pickled Python object "
                                  f"({unsafe.group(1)}), which could run code when loaded; a checkpoint may hold "
                                  f"only tensors and plain values") from None
        raise CheckpointError(f"checkpoint {path} is not a readable checkpoint: {_first_line(err)}") from None
    except (EOFError, RuntimeError, KeyError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable checkpoint (truncated, or not written by "
                              f"torch.save): {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a tcm-pretrain checkpoint "
                              f"(a dict with {list(required)})")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a tcm-pretrain checkpoint (it has "
                              f"{sorted(map(str, state))[:8]})")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def remove_orphan_temps(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Delete the temporary files :func:`save` leaves when killed midway; call it holding the folder's lock."""
    folder = pathlib.Path(folder)
    removed = [p for p in folder.glob(".*.tmp") if _TEMP.match(p.name) and p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``<out_dir>/run.lock``: JSON of the holder's pid, host and start time, created exclusively.

    A second run on the folder gets :class:`RunLockedError` naming the holder; a lock whose process is
    dead on this host is taken over with a warning. A lock from another host cannot be checked, so it
    is refused: the message says which file to delete once that run is known to have ended.
    """

    def __init__(self, out_dir: str | pathlib.Path):
        self.path = pathlib.Path(out_dir) / LOCK_NAME
        self.held = False

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= set(holder) else None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError`; returns ``self``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._me()
        for _ in range(2):  # once more after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    raise RunLockedError(f"{self.path.parent} is locked by {self.path}, which cannot be read; "
                                         f"delete it if no run is using this out_dir") from None
                if holder["host"] == me["host"] and not _pid_alive(int(holder["pid"])):
                    warnings.warn(f"taking over the stale lock {self.path} of process {holder['pid']} on "
                                  f"{holder['host']} (started {holder['started']}), which no longer runs",
                                  RunWarning, stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(f"out_dir {self.path.parent} is in use by process {holder['pid']} on "
                                     f"{holder['host']} (started {holder['started']}); pick another out_dir, or "
                                     f"delete {self.path} if that run has ended") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"out_dir {self.path.parent}: another run took the lock {self.path} at the same time")

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held:
            holder = self._holder()
            if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
