"""The spool: received instances on disk, exactly as they arrived. The source of truth.

An instance is *acknowledged* only after ``write`` returns: bytes fsynced, linked into place,
directory entry fsynced. Files are named by SOP Instance UID (checked safe by the caller, and
hex-encoded unless conformant: :func:`pipeline.uids.file_stem`) in 256 shard directories, so a
million instances never share one directory.

The final name is created with ``link``, which fails when the name exists: of several
associations sending the same instance at once exactly one writes it and hands it on, the others
are acknowledged as resends.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydicom import Dataset, dcmread

from pipeline.errors import SpoolError
from pipeline.uids import file_stem, from_file_stem

SUFFIX = ".dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: errno values of a filesystem without hard links (some SMB/CIFS and FUSE mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})


def _link_or_replace(tmp_name: Path, final: Path) -> bool:
    """Put ``tmp_name`` at ``final`` unless something is there already; False if it was.

    ``link`` fails atomically when the name exists, which settles concurrent sends of one
    instance. Where the filesystem has no hard links, an exists-check and ``replace`` do: a race
    there writes the same bytes twice and may convert the instance twice (idempotent), no worse.
    """
    try:
        os.link(tmp_name, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if final.exists():
            return False
        os.replace(tmp_name, final)
    return True


#: The spool's directory of partial writes, one subdirectory per listener process.
TMP = "tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _remove_parts(top: Path, owned_by: Callable[[int], bool]) -> int:
    """Remove the partial writes under ``top`` except those in the directory of a process for
    which ``owned_by(pid)`` holds; returns how many files went."""
    removed = 0
    for entry in top.iterdir():
        if not entry.is_dir():
            entry.unlink(missing_ok=True)  # a flat tmp/ of an earlier version
            removed += 1
        elif not (entry.name.isdigit() and owned_by(int(entry.name))):
            removed += sum(1 for part in entry.iterdir() if part.is_file())
            shutil.rmtree(entry, ignore_errors=True)
    return removed


class Spool:
    def __init__(self, root: Path, quarantine: Path) -> None:
        self.root = root
        self.quarantine_root = quarantine
        self.tmp = root / TMP
        self._parts = itertools.count()
        for directory in (root, self.tmp, quarantine):
            directory.mkdir(parents=True, exist_ok=True)
        created = False
        for shard in range(256):
            try:  # the node's processes start together: another may be making them too
                (root / f"{shard:02x}").mkdir()
                created = True
            except FileExistsError:
                pass
        if created:
            _fsync_dir(root)

    def path_for(self, sop_uid: str) -> Path:
        shard = hashlib.sha1(sop_uid.encode("ascii"), usedforsecurity=False).hexdigest()[:2]
        return self.root / shard / f"{file_stem(sop_uid)}{SUFFIX}"

    @staticmethod
    def uid_of(path: Path) -> str:
        """The SOP Instance UID a spool or quarantine file is named after."""
        return from_file_stem(path.name.removesuffix(SUFFIX))

    def header(self, sop_uid: str) -> Dataset | None:
        """The spooled instance's data set without its pixel data; None once it was deleted."""
        try:
            return dcmread(self.path_for(sop_uid), stop_before_pixels=True, force=True)
        except FileNotFoundError:
            return None

    def contains(self, sop_uid: str) -> bool:
        return self.path_for(sop_uid).is_file()

    def holds(self, sop_uid: str, data: bytes) -> bool:
        """Whether the spooled copy of ``sop_uid`` is exactly ``data`` (a byte-identical resend)."""
        try:
            return self.path_for(sop_uid).read_bytes() == data
        except FileNotFoundError:
            return False

    def write(self, sop_uid: str, data: bytes, *, replace: bool = False) -> Path | None:
        """Durably store ``data``: temp file, fsync, link into place, fsync the directory.

        Returns the path, or None when the instance was already spooled (a resend, or the same
        instance arriving on another association at the same moment): the first copy stands.
        With ``replace`` (a correction), the new bytes replace the spooled copy atomically.
        """
        final = self.path_for(sop_uid)
        try:
            fd, tmp_name = self._part()
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if replace:
                    os.replace(tmp_name, final)
                elif not _link_or_replace(tmp_name, final):
                    return None
            finally:
                tmp_name.unlink(missing_ok=True)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise SpoolError(f"cannot spool {sop_uid}: {exc.strerror or exc}") from exc
        return final

    def _part(self) -> tuple[int, Path]:
        """A new partial file, open for writing: named by a counter, not mkstemp's random
        names — the directory is this process's own (:meth:`use_own_tmp`); a name taken all
        the same (another Spool on it) is skipped."""
        while True:
            path = self.tmp / f"{next(self._parts)}.part"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path
            except FileExistsError:
                continue

    def walk(self) -> Iterator[Path]:
        """Every spooled instance file (the shard directories only, never tmp)."""
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and shard.name != TMP:
                yield from (p for p in shard.iterdir() if p.suffix == SUFFIX)

    def clean_tmp(self) -> int:
        """Remove every partial write (left by a crash: never acknowledged). Only while no
        listener runs; a running one uses :meth:`use_own_tmp`."""
        return _remove_parts(self.root / TMP, owned_by=lambda _pid: False)

    def use_own_tmp(self) -> int:
        """Write partial files in ``tmp/<pid>`` from now on, and remove those of processes that
        are gone; returns how many. Several listener processes share one spool: one that starts
        must not take another's partial write, which is being received, for a crash's."""
        top = self.root / TMP
        removed = _remove_parts(top, owned_by=_alive)
        self.tmp = top / str(os.getpid())
        self.tmp.mkdir(exist_ok=True)
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _quarantine_paths(self, sop_uid: str) -> tuple[Path, Path]:
        stem = file_stem(sop_uid)
        return self.quarantine_root / f"{stem}{SUFFIX}", self.quarantine_root / f"{stem}.json"

    def quarantine(self, sop_uid: str, source: Path, reason: str, detail: str = "") -> Path:
        """Move an instance out of the spool with its reason beside it, durably."""
        target, note = self._quarantine_paths(sop_uid)
        record = {
            "sop_instance_uid": sop_uid,
            "reason": reason,
            "detail": detail,
            "at": time.time(),
        }
        with open(note, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if source.exists():
            os.replace(source, target)
            _fsync_dir(source.parent)
        _fsync_dir(self.quarantine_root)
        return target

    def restore(self, sop_uid: str) -> Path | None:
        """The instance's spool file, moved back there from quarantine if need be (the copy
        first, then its note: it is never in neither place); None if there is none."""
        path = self.path_for(sop_uid)
        if path.is_file():
            return path
        quarantined, _ = self._quarantine_paths(sop_uid)
        if not quarantined.is_file():
            return None
        os.replace(quarantined, path)
        _fsync_dir(path.parent)
        _fsync_dir(self.quarantine_root)
        self.release(sop_uid)  # the quarantine note
        return path

    def release(self, sop_uid: str) -> bool:
        """Forget a quarantined copy that a resend of the instance supersedes; True if there was
        one. The resend is spooled first, so the instance is never in neither place."""
        removed = False
        for path in self._quarantine_paths(sop_uid):
            if path.exists():
                path.unlink()
                removed = True
        if removed:
            _fsync_dir(self.quarantine_root)
        return removed

    def purge_quarantine(self, older_than_seconds: float = 0.0) -> int:
        """Delete quarantined instances (and their notes) quarantined at least this long ago;
        returns how many. Only an operator does this (``pacs-embed purge``)."""
        cutoff = time.time() - older_than_seconds
        purged = 0
        for copy in sorted(self.quarantine_root.glob(f"*{SUFFIX}")):
            note = copy.with_suffix(".json")
            if (note if note.exists() else copy).stat().st_mtime > cutoff:
                continue
            copy.unlink(missing_ok=True)
            note.unlink(missing_ok=True)
            purged += 1
        if purged:
            _fsync_dir(self.quarantine_root)
        return purged

    def quarantined(self) -> int:
        return sum(1 for _ in self.quarantine_root.glob(f"*{SUFFIX}"))
