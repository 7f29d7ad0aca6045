"""Spectrum files under a spectra root: finding them, checking them, and the one rule for
turning a stored or catalogue path into a file to open.

**Paths never leave the root.** A path relative to the spectra root (a catalogue's
``filename``, ``spectra.file_path``) is only opened when it resolves -- after ``..`` and
symlinks -- to a file inside the root; absolute paths are refused. Ingest quarantines
such a row or file with the reason, the file-based commands treat it as missing, and
inference workers record it as a read failure (:func:`resolve_under_root` is the check
all of them use). A symlink inside the root that points inside the root is fine.
"""
import hashlib
import ntpath
import os
import re
from dataclasses import dataclass
from typing import Optional

SPECTRUM_NAME = re.compile(r"^spec-(\d+)-(.+)_sp(\d+)-(\d+)\.fits(?:\.gz)?$", re.IGNORECASE)
SPECTRUM_FILE = re.compile(r"^spec-.+\.fits?(?:\.gz)?$", re.IGNORECASE)


class UnsafePathError(ValueError):
    """A file path that is absolute or leads outside its spectra root."""


def resolve_under_root(root, relative) -> str:
    """The real (symlink-free) path of ``relative`` under ``root``.

    Raises :class:`UnsafePathError` when ``relative`` is absolute (POSIX or Windows
    style) or resolves outside ``root``, and when there is no root to resolve against.
    Only looks at the path (``lstat`` of its components), never opens anything.
    """
    if not root:
        raise UnsafePathError(f"no spectra root to resolve the file path against: {relative!r}")
    if "\x00" in relative:
        raise UnsafePathError(f"file path with a NUL character refused: {relative!r}")
    if os.path.isabs(relative) or ntpath.isabs(relative) or ntpath.splitdrive(relative)[0]:
        raise UnsafePathError(f"absolute file path refused (paths are relative to the "
                              f"spectra root): {relative!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"file path leads outside the spectra root: {relative!r}")
    return real


class SpectrumIndex:
    """Spectrum files (``spec-*.fits[.gz]``) under a root, found at any depth, by relative
    path and base name. A catalogue's filename column may name other files: those are
    looked up as paths relative to the root."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.by_name = {}            # base name without .gz, lower-case -> [relative paths]
        self.relative_paths = []
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                # Only LAMOST spectrum names: label tables and catalogues may share the tree.
                if not SPECTRUM_FILE.match(name):
                    continue
                relative = os.path.relpath(os.path.join(folder, name), self.root)
                self.relative_paths.append(relative)
                self.by_name.setdefault(_bare_name(name), []).append(relative)
        self.relative_paths.sort()

    def find(self, filename=None, lmjd=None, planid=None, spid=None, fiberid=None):
        """Relative path of a spectrum, or None; :class:`UnsafePathError` when
        ``filename`` (or the file found for it) leads outside the root."""
        if filename:
            candidate = filename.replace("\\", "/")
            for option in (candidate, candidate + ".gz", re.sub(r"\.gz$", "", candidate)):
                if os.path.isfile(resolve_under_root(self.root, option)):
                    return os.path.normpath(option)
            return self._checked(self.by_name.get(_bare_name(os.path.basename(candidate))))
        if None in (lmjd, planid, spid, fiberid):
            return None
        return self._checked(self.by_name.get(_bare_name(standard_name(lmjd, planid, spid,
                                                                       fiberid))))

    def _checked(self, matches):
        if not matches:
            return None
        resolve_under_root(self.root, matches[0])     # a symlink may point outside
        return matches[0]


def standard_name(lmjd, planid, spid, fiberid) -> str:
    return f"spec-{int(lmjd)}-{planid}_sp{int(spid):02d}-{int(fiberid):03d}.fits"


def _bare_name(name):
    name = name.lower()
    return name[:-3] if name.endswith(".gz") else name


@dataclass
class FileInfo:
    relative_path: str
    meta: Optional[dict] = None
    columns: Optional[dict] = None   # file_* columns, layout, data_version
    problem: Optional[str] = None


def inspect_file(root, relative_path) -> FileInfo:
    """Read and check one spectrum file: metadata, layout, size and SHA-256."""
    from models.readers import SpectrumReadError, open_spectrum_file, read_spectrum

    try:
        path = resolve_under_root(root, relative_path)
        spectrum = read_spectrum(path)
        with open_spectrum_file(path) as handle:       # hashed as it is read, not held
            size, digest = 0, hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                size += len(block)
                digest.update(block)
    except UnsafePathError as error:
        return FileInfo(relative_path, problem=str(error))
    except SpectrumReadError as error:
        return FileInfo(relative_path, problem=f"unreadable spectrum file: {error.reason}")
    except OSError as error:
        return FileInfo(relative_path, problem=f"unreadable spectrum file: {error}")
    columns = {
        "file_path": relative_path.replace(os.sep, "/"),
        "file_size": size,
        "file_sha256": digest.hexdigest(),
        "layout": spectrum.layout,
        "data_version": spectrum.meta.get("data_version"),
    }
    return FileInfo(relative_path, meta=spectrum.meta, columns=columns)


def inspect_files(root, relative_paths, workers=4):
    """inspect_file over many files; threads overlap the file I/O and hashing."""
    if workers <= 1 or len(relative_paths) < 8:
        return [inspect_file(root, p) for p in relative_paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: inspect_file(root, p), relative_paths))
