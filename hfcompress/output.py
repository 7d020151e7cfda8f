"""Output folders written whole or not at all, never at the expense of what was there.

Everything goes to a staging folder beside the output (``.OUT.tmp-*``) that is renamed into place
at the end. Replacing an existing output takes two renames: the old folder moves aside into
``.OUT.old-*/OUT``, then the staging folder becomes ``OUT``. A process killed between the two
leaves no ``OUT``; the next writer (or :func:`recover_output`) finds the old folder aside and puts
it back, and removes staging folders that no live run holds.

An output is refused when it is a model the run reads, or a folder holding one: ``--overwrite``
would delete the input before the output exists.

One run writes an output at a time: :func:`output_lock` holds ``.OUT.lock`` (an advisory
``flock``, released by the kernel however the holder ends) from the first check to the final
rename; a second run fails at once, naming the holder's PID.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, UserError

logger = logging.getLogger(__name__)


class OutputLockedError(UserError, BlockingIOError):
    """Another run is writing the same output."""


STAGING = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-\w+")  # .OUT.tmp-PID-XXXX


def final_name(folder: str | os.PathLike) -> str | None:
    """The output name a staging folder will be renamed to, or None for any other folder."""
    match = STAGING.fullmatch(Path(folder).name)
    return match["name"] if match else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _alive(folder: Path) -> bool:
    """Whether the process that named ``folder`` (``.OUT.tmp-PID-*``, ``.OUT.old-PID-*``) still runs."""
    try:
        pid = int(folder.name.rsplit(".", 1)[-1].split("-")[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid != os.getpid()


def recover_output(output: str | os.PathLike) -> None:
    """Put back an output that a killed replacement left aside, and drop staging folders of runs
    that no longer run."""
    output = Path(output)
    parent = output.parent
    if not parent.is_dir():
        return
    _drop_stale_lock(output)
    for aside in sorted(parent.glob(f".{output.name}.old-*")):
        if _alive(aside):
            continue
        kept = aside / output.name
        if kept.is_dir() and not output.exists():
            kept.rename(output)
            logger.warning("%s: restored the previous output, left aside by an interrupted replacement", output)
        elif kept.exists():
            # The new output was renamed into place (the commit point) before the run was killed:
            # the old one is what the run was asked to replace, and would have deleted next.
            logger.warning("%s: removing the output it replaced, left aside by a run killed just after the "
                           "replacement", output)
        shutil.rmtree(aside, ignore_errors=True)
    for staging in sorted(parent.glob(f".{output.name}.tmp-*")):
        if _alive(staging):
            continue
        logger.warning("%s: removing an unfinished output left by an interrupted run", staging)
        shutil.rmtree(staging, ignore_errors=True)


def check_output(output: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output that is one of ``sources`` (or holds one), a file, or an existing non-empty
    folder without ``overwrite``; call before long work starts. Recovers an interrupted replacement."""
    output = Path(output)
    target = output.resolve()
    for source in sources:
        source = Path(source).resolve()
        if _inside(source, target):
            what = "is" if source == target else "holds"
            raise OutputExistsError(f"{output} {what} the input {source}: writing there would delete it; choose "
                                    "another --output")
    recover_output(output)
    if output.is_symlink():
        raise OutputExistsError(f"{output} is a link (to {os.readlink(output)}): give the real folder as --output")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is a file, not a folder: choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"{output} exists and is not empty: pass --overwrite (overwrite=True) to replace it")
    parent = next((p for p in [output.absolute(), *output.absolute().parents] if p.exists()), None)
    if parent is not None and not os.access(parent if parent.is_dir() else parent.parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{output}: {parent} is not writable; choose another --output")
    return output


@contextmanager
def atomic_output(output: str | os.PathLike, overwrite: bool = False,
                  sources: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``output`` (see the module docstring), on any
    error or interruption it is removed and ``output`` stays as it was."""
    check_output(output, overwrite, sources)  # the clear refusals, before the lock creates a missing parent
    with output_lock(output):
        yield from _replace(check_output(output, overwrite, sources))  # again: no other run writes now


def _replace(output: Path) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield staging
        if output.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
            output.rename(aside / output.name)
            staging.rename(output)  # killed between the renames: recover_output puts the old one back
            shutil.rmtree(aside, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_held: dict[Path, tuple[int, int]] = {}  # lock path -> (file descriptor, depth): this process's locks


def _lock_path(output: Path) -> Path:
    output = output.absolute()
    return output.parent / f".{output.name}.lock"


def _drop_stale_lock(output: Path) -> None:
    """Remove the lock file of a run that was killed (the kernel released its lock, the file stayed)."""
    path = _lock_path(output)
    if path in _held or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # held: a live run
    finally:
        os.close(fd)


@contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``output`` (re-entrant within a process); refuse at once when another
    process holds it. The lock file goes when the holder releases it."""
    path = _lock_path(Path(output))
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockedError(f"{output} is being written by another hfcompress run (PID {holder}): wait for it "
                                    f"to finish or stop it (its lock is {path})") from None
        # The holder before us may have removed the file after we opened it: lock the file that is there.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = (fd, 1)
    try:
        yield path
    finally:
        del _held[path]
        path.unlink(missing_ok=True)  # while still locked: a waiting run then sees a fresh file
        os.close(fd)
