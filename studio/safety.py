"""Guards against hostile input and faults: non-finite numbers, full or read-only disks, silent overwrites.

Self-contained helpers used at the call sites (trainer, generator, library, job worker, API):

- ``check_finite_tensors`` refuses NaN/inf tensors and names the first bad one (LoRA files, trained weights).
- ``check_number`` refuses non-finite or out-of-range numbers (weights, guidance, learning rates).
- ``disk_errors`` turns ``ENOSPC``/``EROFS``/``EACCES``/``EDQUOT`` into one readable ``StudioError``.
- ``check_writable`` / ``check_free_space`` run before a long job starts, not after it.
- ``Reservations`` holds the names of files that queued jobs will write, under a lock, so two submissions of one
  name cannot both be accepted.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, LoraFormatError, StudioError

DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the disk is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}
WEIGHT_LIMIT = 10.0  # |LoRA weight| above this only ever saturates the image


class DiskError(StudioError):
    """A write failed because the disk is full, read-only or not ours to write."""


def check_number(value, field: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """``value`` as a finite float within [lo, hi] (``lo_open``: > lo); the message names the field and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{field} must be a number (got {value!r}).") from None
    value = float(value)
    rng = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else (
        f"above {lo:g}" if lo_open else f"at least {lo:g}") if lo is not None else f"at most {hi:g}" if hi is not None else ""
    if not math.isfinite(value):
        raise InputError(f"{field} must be a finite number{' ' + rng if rng else ''} (got {value}).")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        raise InputError(f"{field} must be {rng} (got {value:g}).")
    return value


def check_weight(value, field: str = "weight") -> float:
    return check_number(value, field, -WEIGHT_LIMIT, WEIGHT_LIMIT)


def check_finite_tensors(tensors: dict, what: str) -> None:
    """Raise ``LoraFormatError`` naming the first tensor of ``tensors`` that holds NaN or inf."""
    import torch

    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LoraFormatError(f"{what}: tensor {key!r} holds {bad} NaN/inf value(s); refusing to use it.")


def check_lora_file(path: str | os.PathLike) -> None:
    """Refuse a LoRA file with a non-finite tensor (read tensor by tensor, memory-mapped)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                check_finite_tensors({key: f.get_tensor(key)}, path.name)
    except LoraFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for broken files
        raise LoraFormatError(f"{path.name} is not a readable .safetensors file ({exc}).") from exc


def disk_message(exc: OSError, what: str) -> str:
    reason = DISK_ERRNOS.get(exc.errno, exc.strerror or str(exc))
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    hint = {errno.ENOSPC: "Free some space (old checkpoints/ and outputs/ in the workspace are safe to remove) and try again.",
            errno.EDQUOT: "Free some space and try again.",
            errno.EROFS: "Start the studio with a writable --workspace."}.get(exc.errno, "Check the workspace's permissions.")
    return f"Could not write {what}: {reason}{where}. {hint} Files saved earlier are intact."


@contextmanager
def disk_errors(what: str):
    """Turn disk-full / read-only / permission errors inside the block into one readable ``DiskError``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise DiskError(disk_message(exc, what)) from exc
        raise


def check_writable(folder: Path, what: str = "the workspace") -> None:
    """Write and remove a probe file in ``folder``: a read-only workspace is found before a job, not after it."""
    probe = Path(folder) / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        with disk_errors(what):
            probe.write_bytes(b"ok")
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise DiskError(f"Not enough free disk space for {what}: {need_bytes / 2**20:.0f} MB needed, "
                        f"{free / 2**20:.0f} MB free in {folder}. Free some space and try again.")


class Reservations:
    """Library names that queued or running jobs will write, held under a lock (one per workspace)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # name -> owner (job id)

    @contextmanager
    def locked(self):
        with self._lock:
            yield self

    def taken(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self._held]

    def hold(self, names: list[str], owner: str) -> None:
        for n in names:
            self._held[n] = owner

    def release(self, owner: str) -> None:
        with self._lock:
            for n in [n for n, o in self._held.items() if o == owner]:
                del self._held[n]

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            for n, o in list(self._held.items()):
                if o == old:
                    self._held[n] = new

