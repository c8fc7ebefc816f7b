"""Adapter folders on disk: regular files read safely, and atomic writes that lose nothing.

A folder is written beside its target and swapped in with one ``renameat2`` exchange, so a crash
never leaves a half-written folder in its place and never destroys the previous version. Files in
the folder that the writer does not own (a user's notes, say) are carried into the new folder as
hard links before the swap, so saving replaces only the writer's own files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import AdapterFileError

STAGING_SUFFIXES = (".saving", ".old")  # the hidden siblings a write makes: .<name>.<random><suffix>


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file: a symbolic link in an adapter folder
    could point anywhere on the machine, so it is refused rather than followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise AdapterFileError(f"{path} is missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise AdapterFileError(f"{path} is a symbolic link; "
                                   "adapter files are read only as regular files") from None
        raise AdapterFileError(f"{path} cannot be read: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise AdapterFileError(f"{path} is not a regular file")
        return handle.read()


def read_json(path: Path) -> dict:
    """A JSON object from a regular file, or a clear error naming the file."""
    if not path.exists() and not path.is_symlink():
        raise AdapterFileError(f"{path.parent} holds no {path.name}; is it an adapter folder?")
    try:
        document = json.loads(read_regular_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{path} is corrupt: not valid JSON ({error})") from None
    except RecursionError:
        raise AdapterFileError(f"{path} is corrupt: its JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise AdapterFileError(f"{path} is corrupt: expected a JSON object")
    return document


def write_folder_atomically(path: Path, files: dict[str, bytes], what: str = "the adapter") -> None:
    """Write ``files`` into the folder ``path``, replacing those files and keeping any others; the
    last file is written last (put the one that marks the folder complete there). A failed write
    (a full disk) is an AdapterFileError saying it could not write ``what``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a folder; refusing to replace it")
    try:
        _replace_folder(path, files)
    except OSError as error:
        raise AdapterFileError(f"cannot write {what} to {path}: {error.strerror or error}") from None


def _replace_folder(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".saving", dir=path.parent))
    try:
        if path.is_dir():
            _link_others(path, staging, set(files))
        for file_name, data in files.items():
            _write_durably(staging / file_name, data)
        _fsync_dir(staging)
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(staging, path)
            staging = old
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_files_atomically(writers: dict[Path, Callable[[BinaryIO], object]]) -> None:
    """Write each file (``writers[path](handle)`` fills it) beside its path, and rename them all
    into place only once every one is complete: a failure (a full disk, say) leaves the old files,
    or none, never a partial one. A symbolic link keeps pointing at its file, which is replaced; a
    device or pipe (/dev/stdout) is written as it is. An OSError names the file as given."""
    staged: list[tuple[Path, Path, Path]] = []  # (temporary file, file it replaces, path as given)
    try:
        for path, write in writers.items():
            path = Path(path)
            target = Path(os.path.realpath(path))
            with _naming(path):
                if _is_stream(path):
                    _write_stream(path, write)
                else:
                    staged.append((_stage_file(target, write), target, path))
        for temp, target, path in staged:
            with _naming(path):
                os.replace(temp, target)
    finally:
        for temp, _, _ in staged:
            if os.path.lexists(temp):
                os.unlink(temp)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """OSErrors raised inside name ``path``, the file the caller asked for, not a temporary one."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def _stage_file(target: Path, write: Callable[[BinaryIO], object]) -> Path:
    """A complete, flushed copy of the file to be, as a hidden sibling of ``target``."""
    temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to a plain open()
    try:
        with os.fdopen(fd, "wb") as handle:
            if target.is_file():
                os.fchmod(handle.fileno(), stat.S_IMODE(target.stat().st_mode))  # a replaced file keeps its mode
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def _is_stream(path: Path) -> bool:
    """Whether ``path`` is a device, pipe or socket, or one of the process's own descriptors
    (/dev/stdout, even when it is redirected to a file): written in place, since renaming a file
    over it would replace what it points to rather than write to it."""
    if os.path.realpath(path).startswith(("/dev/", "/proc/")):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (yet)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_stream(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with open(path, "wb") as handle:
        write(handle)


def remove_interrupted_writes(folder: Path, name: str) -> None:
    """Remove the hidden ``.<name>.*.saving`` and ``.<name>.*.old`` folders that a write of
    ``folder/name`` killed mid-way leaves behind. While ``folder/name`` itself is missing, an
    ``.old`` one may be its only complete copy (a kill between the two renames, on a system
    without an atomic exchange): then they are kept."""
    leftovers = [path for suffix in STAGING_SUFFIXES for path in Path(folder).glob(f".{name}.*{suffix}")
                 if path.is_dir() and not path.is_symlink()]
    if (Path(folder) / name).is_dir() or not any(path.name.endswith(".old") for path in leftovers):
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)


def _link_others(source: Path, target: Path, owned: set[str]) -> None:
    """Hard-link every entry of ``source`` that the writer does not own into ``target``."""
    for entry in source.iterdir():
        if entry.name in owned:
            continue
        destination = target / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, destination)


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
