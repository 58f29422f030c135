"""Local filesystem primitives that never follow a symlink inside a run folder.

Everything below the run root is reached through directory descriptors opened with O_NOFOLLOW, so a
symlink planted as `.staging`, `.quarantine`, a `ckpt-*` folder or a file cannot make savegame read,
move or delete anything outside the run folder. The run root itself may be a symlink: whether it
is an acceptable folder is `check_run_folder`'s job.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import stat
from typing import Iterator, Optional

from savegame.errors import ConfigError, MalformedInput, StorageError
from savegame.untrusted import read_regular_file

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
LINK_ERRNOS = (errno.ELOOP, errno.EMLINK, errno.ENOTDIR)  # what O_NOFOLLOW|O_DIRECTORY says about a link


def open_dir(name: str, dir_fd: Optional[int] = None, *, follow: bool = False) -> int:
    """A descriptor of the folder `name` (relative to `dir_fd`); a symlink is refused unless `follow`."""
    return os.open(name, _DIR_FLAGS | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)


@contextlib.contextmanager
def opened_dir(name: str, dir_fd: Optional[int] = None, *, follow: bool = False) -> Iterator[int]:
    fd = open_dir(name, dir_fd, follow=follow)
    try:
        yield fd
    finally:
        os.close(fd)


def real_subdir(root_fd: int, name: str, what: str, create: bool = False) -> Optional[int]:
    """A descriptor of `name` under the root, which must be a real folder; None when it does not exist.

    A symlink (or a file) in its place raises StorageError: following it would let whoever planted
    it steer savegame's writes and deletions anywhere on the machine.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=root_fd)
    try:
        return open_dir(name, root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in LINK_ERRNOS:
            raise StorageError(errno.ELOOP, f"{what} is a symbolic link or not a folder; savegame never follows "
                                            "links inside a run folder: remove it") from None
        raise


def fsync_dir(path: str, dir_fd: Optional[int] = None) -> None:
    with opened_dir(path, dir_fd, follow=dir_fd is None) as fd:
        os.fsync(fd)


def lexists(name: str, dir_fd: int) -> bool:
    """Whether `name` exists (a dangling link counts). Only a real ENOENT is 'no': an error that
    hides the answer (EACCES, EIO) propagates, so nothing is taken for absent that is not."""
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def read_manifest(folder_fd: int, name: str, max_bytes: int) -> tuple[Optional[bytes], bool, Optional[str]]:
    """(bytes, missing, problem) of a manifest file in a folder.

    `missing` is True only when the file really is not there; unreadable, a symlink, a FIFO, a
    device, a folder or too large is a problem (the checkpoint is damaged), never "missing".
    """
    try:
        return read_regular_file(name, max_bytes, dir_fd=folder_fd), False, None
    except FileNotFoundError:
        return None, True, f"no {name}"
    except MalformedInput as exc:
        return None, False, f"{name} {str(exc).split(': ', 1)[-1]}"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            return None, False, f"{name} is a symbolic link, which savegame never follows"
        return None, False, f"{name} unreadable ({exc.strerror or exc})"


def newest_mtime(name: str, dir_fd: int) -> float:
    """The newest modification time of a folder and of everything in it, links not followed."""
    info = os.lstat(name, dir_fd=dir_fd)
    newest = info.st_mtime
    if not stat.S_ISDIR(info.st_mode):
        return newest
    for _path, _dirs, files, fd in os.fwalk(name, dir_fd=dir_fd):
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(file, dir_fd=fd).st_mtime)
    return newest


def file_sizes(name: str, dir_fd: int) -> dict[str, Optional[int]]:
    """Relative path -> size of every regular file below the folder `name`; None for anything that is
    not a regular file (a symlink, a FIFO, a device): its size would say nothing about its content."""
    sizes: dict[str, Optional[int]] = {}
    prefix = name.rstrip("/") + "/"
    for path, _dirs, files, fd in os.fwalk(name, dir_fd=dir_fd):
        rel = (path + "/")[len(prefix):]
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(file, dir_fd=fd)
                sizes[rel + file] = info.st_size if stat.S_ISREG(info.st_mode) else None
    return sizes


def remove_tree(name: str, dir_fd: int) -> None:
    """Remove a folder under `dir_fd`; a symlink in its place is refused, links inside are unlinked,
    never followed (shutil.rmtree's descriptor-based walk)."""
    if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
        raise StorageError(errno.ELOOP, f"{name} is a symbolic link; not removing what it points to")
    shutil.rmtree(name, dir_fd=dir_fd)


# -- the run folder itself -------------------------------------------------------------------------

def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_run_folder(path: str) -> None:
    """Refuse a run folder another user could tamper with: ConfigError naming the owner and the fix.

    Call it once the folder exists. Refused: a folder owned by another user, one that group or
    others may write to, a symlink to such a folder or a symlink owned by another user, and a
    `.staging`, `.quarantine` or `.savegame` inside it that is a symlink or not a folder.
    """
    me = os.geteuid()
    try:
        link = os.lstat(path)
        target = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"run folder {path} does not exist (or is a dangling symlink)") from None
    except OSError as exc:
        raise ConfigError(f"run folder {path}: cannot inspect it ({exc.strerror}); check its permissions") from None
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        raise ConfigError(f"run folder {path} is a symlink owned by {_owner(link.st_uid)}, not by you "
                          f"({_owner(me)}): whoever owns it decides where checkpoints go; use a real folder")
    shown = f"{path} (a symlink to {os.path.realpath(path)})" if stat.S_ISLNK(link.st_mode) else path
    if not stat.S_ISDIR(target.st_mode):
        raise ConfigError(f"run folder {shown} is not a folder")
    if target.st_uid != me:
        raise ConfigError(f"run folder {shown} is owned by {_owner(target.st_uid)}, not by you ({_owner(me)}); "
                          f"run as its owner, or take it over (chown -R {_owner(me).split(' ')[0]} {path}), "
                          "or use a folder of your own")
    if target.st_mode & 0o002 or (target.st_mode & 0o020 and not _private_group(target.st_gid, me)):
        raise ConfigError(f"run folder {shown} can be written by {'group and others' if target.st_mode & 0o002 else 'its group'} "
                          f"(mode {stat.S_IMODE(target.st_mode):04o}), who could plant links or fake checkpoints "
                          f"in it; fix it with: chmod go-w {path}")
    _check_parents(os.path.realpath(path), me)
    _check_own_subfolders(path)


def _check_parents(real: str, me: int) -> None:
    """Whoever may rename an entry of a parent folder may swap the run folder for a link to another
    one, under a running daemon. So every parent must belong to root or to us, and be writable by
    nobody else, unless it is sticky (like /tmp: there only an entry's owner may rename it)."""
    parent = os.path.dirname(real)
    while True:
        try:
            info = os.stat(parent)
        except OSError as exc:
            raise ConfigError(f"cannot inspect {parent}, a parent of the run folder ({exc.strerror})") from None
        writable = info.st_mode & 0o002 or (info.st_mode & 0o020 and not _private_group(info.st_gid, me))
        if info.st_uid not in (0, me) or (writable and not info.st_mode & stat.S_ISVTX):
            who = _owner(info.st_uid)
            raise ConfigError(f"the run folder's parent {parent} belongs to {who} or can be written by others "
                              f"(mode {stat.S_IMODE(info.st_mode):04o}): they could swap the run folder for a link "
                              "to another one while it runs; put the run folder under a folder of your own "
                              "(e.g. ~/runs or /var/lib/savegame)")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _private_group(gid: int, uid: int) -> bool:
    """A user-private group (the user's own primary group, as Debian and Ubuntu make them with umask
    002): no other user has it as a primary group or is listed in it, so writable by the group is
    writable by the user alone."""
    import grp

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid != gid or [m for m in group.gr_mem if m != user.pw_name]:
        return False
    return not any(other.pw_gid == gid and other.pw_uid != uid for other in pwd.getpwall())


def _check_own_subfolders(path: str) -> None:
    for name in (".staging", ".quarantine", ".savegame"):
        try:
            info = os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{os.path.join(path, name)} is a symbolic link or not a folder; savegame never "
                              "follows links inside a run folder: remove it")
