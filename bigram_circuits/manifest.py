"""Run-directory manifests: what made a run (package versions, config) and what it wrote.

``write_manifest(run_dir, kind, config)`` records in ``run_dir/manifest.json`` the versions of
bigram_circuits, Python, torch, transformers, transformer-lens, numpy and safetensors, the run's
config, and the size and SHA-256 of every file under ``run_dir`` (sub-directories included;
hidden temporary files, ``checkpoint.pt`` and the manifest itself excepted). It is written
atomically after the run's other files, so a manifest exists only for a finished run.
``verify_manifest(run_dir)`` re-hashes the listed files and reports which are unchanged,
modified or missing; files added later (e.g. ``evaluation/``) are not its concern.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from bigram_circuits._version import __version__
from bigram_circuits.errors import ManifestError
from bigram_circuits.io import atomic_write_bytes, sha256_file

__all__ = ["MANIFEST_FILE", "environment_versions", "read_manifest", "verify_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "bigram_circuits.manifest"
MANIFEST_VERSION = 1
# Not a result: a search's in-progress checkpoint, deleted when the run finishes.
CHECKPOINT_NAME = "checkpoint.pt"
_PACKAGES = ("bigram_circuits", "torch", "transformers", "transformer-lens", "numpy", "safetensors")


def environment_versions() -> dict[str, str | None]:
    """Installed versions of Python and the packages a run's numbers depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["bigram_circuits"] is None:  # running from a source checkout
        versions["bigram_circuits"] = __version__
    return versions


def _result_files(run_dir: Path) -> list[Path]:
    """Every regular file under ``run_dir`` except hidden (temporary) files, checkpoints and
    the top-level manifest (nested runs' manifests are listed)."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or name == CHECKPOINT_NAME or (name == MANIFEST_FILE and path.parent == run_dir):
                continue
            found.append(path)
    return found


def write_manifest(run_dir: str | os.PathLike, kind: str, config: Mapping) -> Path:
    """Write ``run_dir/manifest.json`` (atomically) for the files now in ``run_dir``.

    ``kind`` names what made the run (``"search"``, ``"sweep"``, ``"find"``); ``config`` is
    any JSON-able mapping of its settings (non-JSON values are stored as strings)."""
    run_dir = Path(run_dir)
    files = {
        path.relative_to(run_dir).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in _result_files(run_dir)
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        "config": dict(config),
        "files": files,
    }
    path = run_dir / MANIFEST_FILE
    atomic_write_bytes(path, json.dumps(manifest, indent=2, default=str).encode("utf-8"))
    return path


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The parsed ``run_dir/manifest.json``; ``ManifestError`` if it is missing or corrupt."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; only finished runs of this package have a manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is unreadable ({type(exc).__name__}); re-run to write it again") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ManifestError(f"{path} is not a bigram_circuits manifest")
    return manifest


def verify_manifest(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Re-hash every file the manifest lists: one row per file with ``path``, ``status``
    (``"ok"``, ``"modified"`` or ``"missing"``), ``expected_sha256`` and ``found_sha256``.
    ``df.attrs["ok"]`` is True when every listed file is unchanged."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    rows = []
    for rel, entry in sorted(manifest["files"].items()):
        path = run_dir / rel
        expected = str(entry.get("sha256", "")) if isinstance(entry, dict) else ""
        found = sha256_file(path) if path.is_file() else None
        status = "missing" if found is None else ("ok" if found == expected else "modified")
        rows.append({"path": rel, "status": status, "expected_sha256": expected, "found_sha256": found})
    table = pd.DataFrame(rows, columns=["path", "status", "expected_sha256", "found_sha256"])
    table.attrs["ok"] = bool((table["status"] == "ok").all())
    return table
