"""Files written safely: atomic writes and directories, output checks, the run-directory lock,
hashing. Every file the package writes goes through here, so none is ever half-written."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from bigram_circuits.errors import OutputError

__all__ = [
    "LOCK_FILE",
    "atomic_directory",
    "atomic_save_into",
    "atomic_write",
    "atomic_write_bytes",
    "ensure_output_dir",
    "run_directory_lock",
    "sha256_file",
]


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write {path}: {reason}; free disk space or choose a writable location")


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory ``path`` (and parents); ``OutputError`` if that is impossible.

    Called before long work so an unwritable destination fails at once, not at the end."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: permission denied; choose a writable location")
    return path


LOCK_FILE = ".lock"


@contextmanager
def run_directory_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (its ``.lock`` file) for the ``with`` block.

    A second process that tries to write the same run directory gets one ``OutputError`` line
    instead of interleaving its checkpoints with the first one's. The lock is an advisory
    ``flock`` released by the OS when the holder exits, so a killed process leaves no stale
    lock (the empty ``.lock`` file stays; it is hidden and ignored by manifests). Without
    ``fcntl`` (Windows) the block runs unlocked."""
    path = ensure_output_dir(directory)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        yield path
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another process is writing {path}; wait for it to finish or use another output directory"
            ) from None
        held = True
        yield path
    finally:
        # A run that wrote nothing (e.g. it failed early) leaves its directory as it found it.
        if held and [entry.name for entry in path.iterdir()] == [LOCK_FILE]:
            (path / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary handle whose content replaces ``path`` only when the block succeeds.

    The data goes to a temporary file next to ``path`` (``.NAME.*.tmp``) that is renamed over
    ``path`` at the end, so ``path`` is never half-written; on any error the temporary file is
    removed. Every package write goes through here. ``OutputError`` for OS errors (disk full,
    permission denied, a file where a directory should be)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the usual umask-based permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(path, exc) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    with atomic_write(path) as handle:
        handle.write(data)


@contextmanager
def atomic_directory(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Fill a fresh sibling directory, then swap it in for ``target`` (never half-written).

    With ``keep_existing``, a ``target`` that another process completed meanwhile is kept (its
    content is the same) and the staged copy is dropped."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as exc:
        raise _output_error(target, exc) from exc
    try:
        yield staging
        if keep_existing and target.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_save_into(out_dir: str | os.PathLike, save: Callable[[Path], object]) -> list[Path]:
    """Run ``save(staging_dir)`` (e.g. ``tokenizer.save_pretrained``) in a temporary directory
    inside ``out_dir``, then rename each file it wrote into ``out_dir``: every file appears
    whole or not at all. Returns the files' final paths."""
    out_dir = ensure_output_dir(out_dir)
    moved = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging.") as tmp:
        save(Path(tmp))
        try:
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    final = out_dir / path.relative_to(tmp)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, final)
                    moved.append(final)
        except OSError as exc:
            raise _output_error(out_dir, exc) from exc
    return moved


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (archives, weights, run outputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
