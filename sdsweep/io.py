"""Atomic writes: a kill at any instant leaves the old file (or folder) or the new one, never half.

Everything a later stage trusts (metrics.json, adapters, checkpoints, the leaderboard)
goes through here: write to a temporary name in the same folder, fsync, then rename.
The temporary names are made here only (`.<name>.<8 random>.tmp`, and `.<name>.old` while a
folder is replaced), so `remove_leftovers` is the one place that knows what a kill leaves behind.

Files and folders get the modes any program's files get (0o666 and 0o777, less the umask), not tempfile's
private 0600/0700, nor the 0600 of what safetensors writes (it writes through a Rust temporary file): a
sweep in a shared folder stays readable by the group under umask 002/022. A write that fails for lack
of space raises `DiskFull`, naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# the temporary names this module makes: tempfile's 8 characters (leftovers of older versions) or 8 hex digits
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
_OLD_NAME = re.compile(r"\.(?P<name>.+)\.old")
_SPACE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
# torch.save's C++ writer reports a short write without its errno ("unexpected pos 704 vs 598",
# "file write failed"): it is a full disk when (almost) nothing is left free at that moment
_SHORT_WRITE = ("unexpected pos", "file write failed")
_LOW_SPACE = 64 * 2**20


# --- writing ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_UMASK_LOCK = threading.Lock()


def process_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status); elsewhere
    os.umask, which only sets it, is set to 022 and put back at once (a thread creating a file in between
    gets 022, never 0)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under this umask: 0o666 less the umask (0644 under 022, 0664 under 002)."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    return 0o777 & ~process_umask()


def follow_umask(folder: Path) -> None:
    """`folder` and everything in it to 0o777/0o666 less the umask, whatever mode the library that wrote
    a file gave it (safetensors: 0600); and every file fsynced, before the folder is renamed into place."""
    files, folders = file_mode(), dir_mode()
    os.chmod(folder, folders)
    for f in folder.rglob("*"):
        if f.is_symlink():  # chmod would follow it out of the folder
            continue
        if f.is_dir():
            os.chmod(f, folders)
            continue
        os.chmod(f, files)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _open_temp_file(path: Path) -> tuple[int, Path]:
    """A new file beside `path` under a temporary name, mode 0o666 less the umask (mkstemp's is 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        with contextlib.suppress(FileExistsError):
            return os.open(tmp, flags, 0o666), tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _new_temp_dir(path: Path) -> Path:
    """The temporary folder `path` is built in (its parent made first); a full disk raises DiskFull naming `path`."""
    with _staged(path, lambda: None):
        path.parent.mkdir(parents=True, exist_ok=True)
        return _make_temp_dir(path)


def _make_temp_dir(path: Path) -> Path:
    """A new folder beside `path` under a temporary name, mode 0o777 less the umask (mkdtemp's is 0700)."""
    for _ in range(100):
        tmp = _temp_name(path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(tmp, 0o777)
            return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def file_state(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time in ns): what something remembered or cached from a file's
    contents is keyed on, so that a rewritten file is read again. Raises OSError when it cannot be read."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with _staged(path, lambda: None):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _open_temp_file(path)
    with _staged(path, lambda: _remove(tmp)):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _staged(path: Path, remove: Callable[[], None]) -> Iterator[None]:
    """Around the writing of `path`'s temporary copy: on any error `remove` it, and raise a failed write
    as DiskFull or WriteFailed (with the free space as it failed, measured before the removal)."""
    try:
        yield
    except BaseException as e:
        failure = write_failure(e, path, exact=True)
        remove()
        if failure is not None and failure is not e:
            raise failure from e
        raise


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as null (with the reason kept elsewhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = _new_temp_dir(path)
    with _staged(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        follow_umask(tmp)
        if path.exists():
            # rename the old folder away first: a kill between the two renames leaves
            # `.name.old` to recover from (remove_leftovers), and `path` never holds a mix of both
            old = _old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the old one back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir_if_absent(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path`, unless another process
    made `path` meanwhile: then theirs is kept and this one removed (a cache entry built once)."""
    path = Path(path)
    tmp = _new_temp_dir(path)
    with _staged(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        follow_umask(tmp)
        try:
            os.rename(tmp, path)  # not os.replace: a folder already there (not empty) is kept
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(path.parent)


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


# --- what a kill leaves behind ----------------------------------------------------------------------


def remove_leftovers(folder: Path) -> list[str]:
    """Remove the temporary files and folders this module's writers left in `folder` when killed
    (its own entries only, not below); return what was done, one line each.

    `.name.old` is the previous version of folder `name`, renamed away just before the new one
    took its place: when `name` is missing the kill came between the two renames, and it is
    renamed back (it was complete); otherwise it is removed. Only for a folder no other process
    is writing in at the moment (a trial's own folder, a sweep's before or after its trials):
    a temporary name may be another writer's work in progress.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        if _TEMP_NAME.fullmatch(entry.name):
            _remove(entry)
            done.append(f"removed {entry}")
        elif (old := _OLD_NAME.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink():
            kept = entry.with_name(old["name"])
            if kept.exists() or kept.is_symlink():
                _remove(entry)
                done.append(f"removed {entry}")
            else:
                os.replace(entry, kept)
                done.append(f"recovered {kept} from {entry.name}")
    return done


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


# --- failed writes ----------------------------------------------------------------------------------


class WriteFailed(OSError):
    """A write to `path` that failed in a way the library did not explain (torch's short writes);
    the message names the path and the space left on its disk."""

    def __init__(self, path: Path, free: int | None, detail: str, code: int = errno.EIO):
        super().__init__(code, detail, str(path))
        self.path, self.free = Path(path), free
        self.message = f"write failed at {path} ({_free_text(free)}): {detail}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # OSError's pickles as cls(errno, strerror): not this constructor (joblib pickles)
        return type(self)._rebuilt, (self.path, self.free, self.strerror, self.errno)

    @classmethod
    def _rebuilt(cls, path: Path, free: int | None, detail: str, code: int) -> WriteFailed:
        return WriteFailed(path, free, detail, code) if cls is WriteFailed else cls(path, free, code)


class DiskFull(WriteFailed):
    """A write to `path` that failed for lack of space (ENOSPC), or of quota (EDQUOT)."""

    def __init__(self, path: Path, free: int | None, code: int = errno.ENOSPC):
        super().__init__(path, free, _SPACE_ERRNOS[code], code)
        self.message = f"{_SPACE_ERRNOS[code]} at {path}: {_free_text(free)}"


def free_bytes(path: Path) -> int | None:
    """The space free for this user on the disk holding `path` (or its nearest existing folder)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def _free_text(free: int | None) -> str:
    return "free space unknown" if free is None else f"{free // 2**20} MiB free"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, and so on (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _space_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return exc.errno
    # safetensors (Rust) folds the OS error into its message: "I/O error: No space left on device (os error 28)"
    text = str(exc)
    return next((code for code in _SPACE_ERRNOS if f"(os error {code})" in text or os.strerror(code) in text), None)


def write_failure(exc: BaseException, path: Path, exact: bool = False) -> WriteFailed | None:
    """`exc` as a failure to write `path` when it (or an exception it came from) is one that needs
    saying: DiskFull for a lack of space, WriteFailed for a short write that is not one; else None.

    `exact`: the error is about writing `path` itself (an atomic writer's own), so the message names
    `path`, not the temporary name the library was writing; otherwise the failing file's own name."""
    path = Path(path)
    chain = list(_chain(exc))
    known = next((e for e in chain if isinstance(e, WriteFailed)), None)
    if known is not None and (not exact or known.path == path):
        return known
    for e in chain:
        if (code := _space_errno(e)) is not None:
            named = isinstance(e, OSError) and e.filename and not exact
            where = Path(os.fsdecode(e.filename)) if named else path
            return DiskFull(where, free_bytes(where), code)
    if known is not None:
        return WriteFailed(path, free_bytes(path), known.strerror, known.errno)
    short = next((e for e in chain if isinstance(e, RuntimeError) and any(s in str(e) for s in _SHORT_WRITE)), None)
    if short is None:
        return None
    free = free_bytes(path)
    if free is not None and free < _LOW_SPACE:
        return DiskFull(path, free)
    return WriteFailed(path, free, f"{type(short).__name__}: {short}")


def describe_write_error(exc: BaseException, path: Path) -> str:
    """One line on why writing `path` failed: the disk-full message, or the error with the free space."""
    if failure := write_failure(exc, path, exact=True):
        return str(failure)
    return f"{type(exc).__name__}: {exc} ({_free_text(free_bytes(path))} at {Path(path).parent})"
