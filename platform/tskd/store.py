"""A content-addressed store of stage outputs, shared by every run under one output directory.

Layout (``<output_dir>/store/``)::

    <stage>/<fingerprint>/          a complete entry: the stage's files + manifest.json (last)
    <stage>/<fingerprint>/.last_used  touched on every build and reuse (its mtime is the last use)
    <stage>/.tmp-<fp>-<pid>-<rand>/ an entry being built (never read; removed by the next builder)
    <stage>/.locks/<fp>.lock        the builders' lock for one entry (holder: "pid host time")

An entry is *complete* when its ``manifest.json`` exists, reads and says ``"status":
"complete"``; the manifest is written last into the temporary entry, which is then renamed into
place, so a crashed builder leaves nothing that looks complete. Its ``content_hash`` (sha256 over
the relative paths and bytes of every file but the manifest and ``.last_used``) is computed once,
at publish time; downstream fingerprints include it, so an entry re-built with different content
invalidates everything built from the old one.

Concurrent builders of one entry build it once: :meth:`Store.resolve` takes an exclusive
``flock`` on the entry's lock file, re-checks for a complete entry (the first builder's), and only
then builds. The kernel drops the lock when the holder's process dies, so a crashed builder never
blocks the next one. On NFS, Linux implements ``flock`` with NFS byte-range locks (NLM for v3,
the protocol's own locks for v4): a dead process's lock is released by its client at once, a dead
client's when the server's lease/grace period ends (about 90 s for NFSv4); locks there are
per process, which the in-process thread lock below covers. Other network filesystems (and object
stores) need their own lock service: replace :class:`EntryLock`.

Runs reference entries through ``<output_dir>/<experiment>/stages.json`` (see
:mod:`tskd.artifacts`); :func:`garbage` lists entries that no run references.

**Object-store outputs** (``output_dir: s3://bucket/prefix``, ``gs://``, ``abfs://``; see
:mod:`tskd.storage`). The remote tree has the same layout and is the source of truth; each node
works in a local mirror (``<mirror_dir>/<sha of the URI>/``, the layout above) through the same
code as a local store. :meth:`Store.get` reads the remote entry's ``manifest.json``; a complete
one is downloaded into the mirror once (checked against its ``content_hash``; a mirror copy with
that hash is used as it is). A build runs in the mirror exactly as locally (flock, temporary
entry, rename), then :meth:`Store.resolve` uploads every file and the manifest *last*: a crashed
upload leaves files without a manifest, which no reader takes for complete and the next builder
deletes before its own upload. A mirror entry whose upload was lost is uploaded by the next
``resolve`` that needs it instead of being rebuilt. Run views (``stages.json``,
``results.json``) are uploaded after every change (:meth:`Store.record_run`) and pulled at the
start of a run (:meth:`Store.pull_run`), so a second run on another machine resumes.

Locking on object stores: there is no flock and no lease object. The flock above still keeps
builders on one node apart; builders on *different* nodes of one entry may both build (the
fingerprint makes their outputs equivalent, not necessarily bit-identical: e.g. GPU kernels).
A builder that finds a complete remote manifest when it is about to upload discards its own
copy and uses the published one (first complete manifest wins); if two uploads overlap
exactly, the last manifest wins and a reader whose download does not match the manifest's
content hash retries. ``tskd store gc`` works on local output directories only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tskd import storage
from tskd.artifacts import write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LAST_USED = ".last_used"
LOCKS = ".locks"
TMP_PREFIX = ".tmp-"
VIEW_FILE = "stages.json"
_NOT_CONTENT = {MANIFEST, LAST_USED}
_CHUNK = 1 << 20

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


class StoreError(RuntimeError):
    """A store operation failed (lock timeout, a build that wrote no manifest...)."""


@dataclass(frozen=True)
class Entry:
    """A complete store entry.

    Attributes:
        stage: the stage name (first path component under the store).
        fingerprint: the stage fingerprint (the entry's directory name).
        path: the entry directory.
        manifest: its parsed ``manifest.json``.
    """

    stage: str
    fingerprint: str
    path: Path
    manifest: dict[str, Any]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def published(self) -> float:
        return float(self.manifest.get("published", 0.0))

    def last_used(self) -> float:
        """Unix time of the last build or reuse (the manifest's mtime if never touched)."""
        for name in (LAST_USED, MANIFEST):
            try:
                return (self.path / name).stat().st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    def size(self) -> int:
        return tree_size(self.path)


# ---------------------------------------------------------------------------------- hashing


def content_hash(root: Path) -> str:
    """sha256 over the sorted relative paths and bytes of the files under ``root`` (symlinks
    are hashed as their target string), excluding the manifest and the last-use marker."""
    h = hashlib.sha256()
    root = Path(root)
    for path in sorted(_files(root)):
        rel = path.relative_to(root).as_posix()
        if rel in _NOT_CONTENT:
            continue
        h.update(rel.encode() + b"\0")
        if path.is_symlink():
            h.update(b"L" + os.readlink(path).encode() + b"\0")
            continue
        h.update(b"F")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def tree_identity(root: Path) -> str:
    """A cheap identity of a directory tree (e.g. a dataset): sha256 over every file's relative
    path, size and modification time (ns). Any added, removed, resized or re-written file changes
    it; no file is read."""
    h = hashlib.sha256()
    root = Path(root).expanduser().resolve()
    for path in sorted(_files(root)):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """A cheap identity of one (possibly multi-GB) file: its resolved path, size and mtime (ns);
    the file is not read. A copy elsewhere or a touch gives a new identity (a cache miss, never a
    wrong hit)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def _files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():
                yield base / name
        for name in filenames:
            yield base / name


def tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size
    return total


# ---------------------------------------------------------------------------------- locking


class EntryLock:
    """An exclusive lock on one store entry: ``flock`` on ``<stage>/.locks/<fp>.lock`` plus a
    thread lock (flock on NFS is per process). Released by the kernel if the process dies.

    Args:
        path: the lock file.
        timeout: seconds to wait; ``None`` waits as long as the holder lives.
    """

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._fd: int | None = None
        with _thread_locks_guard:
            self._tlock = _thread_locks.setdefault(str(self.path), threading.Lock())

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; ``blocking=False`` returns False at once if another holds it."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if not blocking:
            got = self._tlock.acquire(blocking=False)
        else:
            got = self._tlock.acquire(timeout=-1 if self.timeout is None else self.timeout)
        if not got:
            if blocking:
                raise StoreError(f"timed out after {self.timeout} s waiting for {self.path}")
            return False
        try:
            ok = self._flock(blocking, deadline)
        except BaseException:
            self._tlock.release()
            raise
        if not ok:
            self._tlock.release()
        return ok

    def _flock(self, blocking: bool, deadline: float | None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        delay = 0.05
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not blocking:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreError(f"timed out after {self.timeout} s waiting for {self.path} "
                                     f"(held by {self.holder() or 'unknown'})") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            # gc may have unlinked the file between our open and flock: lock the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode())
            self._fd = fd
            return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._tlock.release()

    def __enter__(self) -> EntryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------------- the store


Builder = Callable[[Path], dict[str, Any]]
"""Fills the (empty) temporary entry directory it is given and returns the manifest to publish
(without ``content_hash``/``published``, which the store adds)."""


@dataclass(frozen=True)
class Remote:
    """The object-store side of a store: ``uri`` (the ``output_dir``), its pyarrow filesystem
    and the output root inside it (``bucket/prefix``)."""

    uri: str
    fs: Any
    root: str

    @property
    def store(self) -> str:
        return storage.join(self.root, "store")


class Store:
    """The store under ``root`` (``<output_dir>/store``).

    Args:
        root: the store directory (created on first publish); for an object-store output, the
            store of this node's mirror.
        lock_timeout: seconds a builder waits for another builder of the same entry;
            ``None`` waits as long as that builder's process lives.
        remote: the object store behind the mirror (None: a local store).
    """

    def __init__(self, root: Path, lock_timeout: float | None = None,
                 remote: Remote | None = None) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.remote = remote

    @classmethod
    def for_output_dir(cls, output_dir: str | Path,
                       mirror_dir: str | Path | None = None, **kwargs: Any) -> Store:
        """The store of ``output_dir``: a local path, or an object-store URI (entries mirrored
        under ``mirror_dir`` on this node; default: the config's)."""
        if storage.is_remote(str(output_dir)):
            from tskd.config import ExperimentConfig

            mirror_dir = mirror_dir or ExperimentConfig.mirror_dir
            uri = str(output_dir).rstrip("/")
            fs, root = storage.open_output(uri)
            return cls(storage.mirror_root(uri, mirror_dir) / "store",
                       remote=Remote(uri, fs, root), **kwargs)
        return cls(storage.local_path(output_dir) / "store", **kwargs)

    @property
    def output_dir(self) -> Path:
        """The local output directory (for an object store: this node's mirror of it)."""
        return self.root.parent

    def train_dir(self, stage: str, fp: str, prefix: str) -> str | Path:
        """Ray Train's storage for building ``stage/fp``: ``store/<stage>/<prefix><fp>``, a URI
        on the object store for remote outputs (every node reaches it)."""
        if self.remote is not None:
            return f"{self.remote.uri}/store/{stage}/{prefix}{fp}"
        return self.root / stage / f"{prefix}{fp}"

    def entry_dir(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def lock(self, stage: str, fp: str) -> EntryLock:
        return EntryLock(self.root / stage / LOCKS / f"{fp}.lock", self.lock_timeout)

    def get(self, stage: str, fp: str) -> Entry | None:
        """The complete entry, or None. For an object-store output: the remote entry, in this
        node's mirror (downloaded the first time)."""
        if self.remote is None:
            return self._local_get(stage, fp)
        manifest = self._remote_manifest(stage, fp)
        if manifest is None:
            return None
        local = self._local_get(stage, fp)
        if local is not None and local.content_hash == manifest["content_hash"]:
            return local
        return self._download(stage, fp)

    def has(self, stage: str, fp: str) -> bool:
        """Whether the complete entry ``stage/fp`` exists (here, or on the object store), without
        downloading it."""
        if self._local_get(stage, fp) is not None:
            return True
        return self.remote is not None and self._remote_manifest(stage, fp) is not None

    def _local_get(self, stage: str, fp: str) -> Entry | None:
        path = self.entry_dir(stage, fp)
        manifest = read_json(path / MANIFEST)
        if not _complete(manifest):
            return None
        return Entry(stage, fp, path, manifest)

    def _remote_dir(self, stage: str, fp: str) -> str:
        assert self.remote is not None
        return storage.join(self.remote.store, stage, fp)

    def _remote_manifest(self, stage: str, fp: str) -> dict[str, Any] | None:
        manifest = storage.read_json(self.remote.fs, storage.join(self._remote_dir(stage, fp),
                                                                 MANIFEST))
        return manifest if _complete(manifest) else None

    def _download(self, stage: str, fp: str, attempts: int = 3) -> Entry | None:
        """The remote entry into the mirror (a temporary directory renamed into place); None if
        it disappeared. Retries when the files do not match the manifest's content hash (an
        upload of the same entry by another builder overlapped)."""
        for attempt in range(attempts):
            manifest = self._remote_manifest(stage, fp)
            if manifest is None:
                return None
            tmp = self.root / stage / f"{TMP_PREFIX}{fp}-dl-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                storage.download_dir(self.remote.fs, self._remote_dir(stage, fp), tmp)
                got = read_json(tmp / MANIFEST)
                if _complete(got) and content_hash(tmp) == got["content_hash"]:
                    log.info("%s/%s: downloaded from %s", stage, fp, self.remote.uri)
                    return self._place(stage, fp, tmp, got)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.warning("%s/%s: the remote entry changed while it was downloaded (attempt %d)",
                        stage, fp, attempt + 1)
            time.sleep(0.5 * (attempt + 1))
        raise StoreError(f"{self.remote.uri}/store/{stage}/{fp}: its files do not match its "
                         f"manifest's content hash after {attempts} downloads")

    def _place(self, stage: str, fp: str, tmp: Path, manifest: dict[str, Any]) -> Entry:
        """Rename the downloaded ``tmp`` to the entry's mirror directory (an older copy there
        moves aside; a concurrent downloader's identical copy is kept)."""
        final = self.entry_dir(stage, fp)
        touch(tmp / LAST_USED)
        try:
            _swap_in(tmp, final)
        except OSError:
            other = self._local_get(stage, fp)
            if other is None or other.content_hash != manifest["content_hash"]:
                raise
        return Entry(stage, fp, final, manifest)

    def _upload(self, entry: Entry, force: bool) -> Entry:
        """Publish a mirror entry on the object store: delete what an interrupted upload left,
        upload every file, the manifest last. Unless ``force``, a complete remote entry that
        appeared meanwhile (another node's builder) wins: it replaces this node's copy."""
        remote = self._remote_dir(entry.stage, entry.fingerprint)
        fs = self.remote.fs
        if not force and self._remote_manifest(entry.stage, entry.fingerprint) is not None:
            log.info("%s/%s: published by another builder meanwhile; using its copy",
                     entry.stage, entry.fingerprint)
            return self._download(entry.stage, entry.fingerprint) or entry
        manifest_path = storage.join(remote, MANIFEST)
        if storage.exists(fs, manifest_path):  # --force: incomplete first, then replaced
            fs.delete_file(manifest_path)
        storage.delete_dir(fs, remote)
        storage.upload_dir(entry.path, fs, remote, last=[MANIFEST], skip=[LAST_USED])
        log.info("%s/%s: uploaded to %s", entry.stage, entry.fingerprint, self.remote.uri)
        return entry

    def pull_run(self, run_dir: Path) -> None:
        """For an object-store output: the run's view (``stages.json`` and the run files) from
        the remote into the mirror's ``run_dir`` (a run started on another machine resumes)."""
        if self.remote is None:
            return
        run_dir = Path(run_dir)
        src = storage.join(self.remote.root, run_dir.name)
        for name in storage.list_files(self.remote.fs, src):
            if "/" not in name and name.endswith(".json"):
                run_dir.mkdir(parents=True, exist_ok=True)
                with self.remote.fs.open_input_stream(storage.join(src, name)) as f:
                    data = f.read()
                tmp = run_dir / f".{name}.{os.getpid()}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, run_dir / name)

    def push_run_file(self, run_dir: Path, name: str) -> None:
        """Upload ``<run_dir>/<name>`` to ``<uri>/<experiment>/<name>`` (remote outputs)."""
        if self.remote is None or not (Path(run_dir) / name).is_file():
            return
        storage.upload_file(Path(run_dir) / name, self.remote.fs,
                            storage.join(self.remote.root, Path(run_dir).name, name))

    def record_run(self, run_dir: Path, stage: str, entry: Entry) -> None:
        """:func:`record_use`, and the view uploaded for remote outputs."""
        record_use(run_dir, stage, entry)
        self.push_run_file(run_dir, VIEW_FILE)

    def resolve(self, stage: str, fp: str, build: Builder, *, force: bool = False,
                rebuilt_after: float | None = None) -> tuple[Entry, bool]:
        """The complete entry ``stage/fp``, built by ``build`` if needed; returns
        ``(entry, built)``.

        Args:
            force: build again even if the entry exists, unless it was published at or after
                ``rebuilt_after`` (another builder re-built it while this one waited).
        """
        if not force:
            entry = self.get(stage, fp)
            if entry is not None:
                touch(entry.path / LAST_USED)
                return entry, False
        with self.lock(stage, fp):
            entry = self.get(stage, fp)
            fresh = entry is not None and rebuilt_after is not None \
                and entry.published >= rebuilt_after
            if entry is not None and (not force or fresh):
                log.info("%s/%s: built by another run meanwhile, reused", stage, fp)
                touch(entry.path / LAST_USED)
                return entry, False
            if self.remote is not None and not force:
                local = self._local_get(stage, fp)
                if local is not None:  # built here, but its upload was lost (or gc'd)
                    log.info("%s/%s: uploading this node's copy (not on %s)", stage, fp,
                             self.remote.uri)
                    return self._upload(local, force=False), False
            self._remove_temporaries(stage, fp)
            entry = self._build_and_publish(stage, fp, build)
            if self.remote is not None:
                entry = self._upload(entry, force=force)
            return entry, True

    def _build_and_publish(self, stage: str, fp: str, build: Builder) -> Entry:
        tmp = self.root / stage / f"{TMP_PREFIX}{fp}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            manifest = build(tmp)
            if (tmp / MANIFEST).exists():
                raise StoreError(f"stage {stage} wrote its own {MANIFEST}; the store writes it")
            manifest = {**manifest, "status": "complete", "content_hash": content_hash(tmp),
                        "published": time.time()}
            write_json(tmp / MANIFEST, manifest)
            _fsync_dir(tmp)
            touch(tmp / LAST_USED)
            final = self.entry_dir(stage, fp)
            _swap_in(tmp, final)  # --force: the old entry moves aside first
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(stage, fp, final, manifest)

    def _remove_temporaries(self, stage: str, fp: str) -> None:
        """Leftovers of crashed builders of ``stage/fp`` (only called under the entry lock)."""
        for tmp in (self.root / stage).glob(f"{TMP_PREFIX}{fp}-*"):
            if _active_download(tmp):  # another process of this node fetching the entry
                continue
            log.info("removing the leftover of an interrupted build: %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every complete entry, sorted by stage and fingerprint."""
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(stage_dir.iterdir()):
                if path.name.startswith(".") or not path.is_dir():
                    continue
                entry = self.get(stage_dir.name, path.name)
                if entry is not None:
                    out.append(entry)
        return out

    def temporaries(self) -> list[Path]:
        """Temporary entries (builds in progress or left by crashed builders)."""
        if not self.root.is_dir():
            return []
        return sorted(p for stage_dir in self.root.iterdir() if stage_dir.is_dir()
                      for p in stage_dir.glob(f"{TMP_PREFIX}*"))

    def remove(self, entry: Entry) -> bool:
        """Delete ``entry`` unless a builder holds its lock; True if deleted."""
        lock = self.lock(entry.stage, entry.fingerprint)
        if not lock.acquire(blocking=False):
            return False
        try:
            doomed = entry.path.with_name(f"{TMP_PREFIX}{entry.fingerprint}-gc-"
                                          f"{secrets.token_hex(4)}")
            os.replace(entry.path, doomed)  # disappears atomically, then is deleted
            shutil.rmtree(doomed, ignore_errors=True)
            lock.path.unlink(missing_ok=True)
        finally:
            lock.release()
        return True

    def remove_temporary(self, tmp: Path) -> bool:
        """Delete a temporary entry whose builder is gone (its lock is free)."""
        fp = tmp.name[len(TMP_PREFIX):].split("-")[0]
        lock = self.lock(tmp.parent.name, fp)
        if not lock.acquire(blocking=False):
            return False
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
        return True


@dataclass(frozen=True)
class InputRefs:
    """The input entries of a stage being built on an object-store output, as a Ray worker
    on any node fetches them: :meth:`fetch` downloads each into that node's mirror, at the
    same path as on the driver (``mirror_dir`` is resolved by the driver, so every node must
    be able to write it: the same user and home on every node, or an absolute path).
    Holds no credentials: each node's filesystem reads its own environment."""

    output_dir: str
    mirror_dir: str
    entries: tuple[tuple[str, str], ...]

    def fetch(self) -> None:
        store = Store.for_output_dir(self.output_dir, self.mirror_dir)
        for stage, fp in self.entries:
            if store.get(stage, fp) is None:
                raise StoreError(f"{self.output_dir}/store/{stage}/{fp}: no complete entry "
                                 "(removed while a stage that reads it ran?)")

    def uri(self, stage: str, fp: str) -> str:
        return f"{self.output_dir.rstrip('/')}/store/{stage}/{fp}"


# ---------------------------------------------------------------------------------- runs


def record_use(run_dir: Path, stage: str, entry: Entry) -> None:
    """Point the run's view at ``entry``: its record in ``<run_dir>/stages.json`` (what ``gc``
    honours) and, where the filesystem allows, the link ``<run_dir>/<stage> -> entry``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    view = run_dir / VIEW_FILE
    data = read_json(view)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        data = {"stages": {}}
    data["stages"][stage] = {"fingerprint": entry.fingerprint,
                             "content_hash": entry.content_hash,
                             "entry": os.path.relpath(entry.path, run_dir),
                             "used": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(view, data)
    _link(run_dir / stage, entry.path)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an entry already at ``final`` is moved aside
    first (renamed to a temporary name, removed after the swap), so readers never see a half
    entry."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}{final.name}-old-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _link(link: Path, target: Path) -> None:
    """Atomically (re)point the symlink ``link`` at ``target`` (relative); a real directory
    there (a stage of a run from before the store) moves to ``<run>/.pre-store/<stage>``."""
    if link.exists() and not link.is_symlink():
        aside = link.parent / ".pre-store" / f"{link.name}-{secrets.token_hex(4)}"
        aside.parent.mkdir(exist_ok=True)
        os.replace(link, aside)
        log.warning("moved %s (a stage directory from before the store) to %s", link, aside)
    tmp = link.with_name(f".{link.name}.link-{secrets.token_hex(4)}")
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot link %s -> %s (%s); see %s", link, target, exc, VIEW_FILE)


def read_view(run_dir: Path) -> dict[str, dict[str, str]]:
    """Stage -> its record in ``<run_dir>/stages.json`` (empty if none)."""
    data = read_json(Path(run_dir) / VIEW_FILE)
    return data.get("stages", {}) if isinstance(data, dict) else {}


def referenced(output_dir: Path) -> dict[tuple[str, str], list[str]]:
    """``(stage, fingerprint) -> [experiment, ...]`` for every run under ``output_dir`` (each
    ``<output_dir>/<experiment>/stages.json``)."""
    refs: dict[tuple[str, str], list[str]] = {}
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return refs
    for view in sorted(output_dir.glob(f"*/{VIEW_FILE}")):
        data = read_json(view)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise StoreError(f"{view} is unreadable: cannot tell which store entries that run "
                             "uses; fix or delete it first")
        for stage, rec in data["stages"].items():
            refs.setdefault((stage, rec["fingerprint"]), []).append(view.parent.name)
    return refs


def garbage(store: Store, output_dir: Path) -> list[Entry]:
    """Entries no run under ``output_dir`` references."""
    refs = referenced(output_dir)
    return [e for e in store.entries() if (e.stage, e.fingerprint) not in refs]


# ---------------------------------------------------------------------------------- helpers


def _active_download(tmp: Path, max_age_s: float = 3600.0) -> bool:
    """A download directory (``.tmp-<fp>-dl-...``) touched in the last hour."""
    try:
        return "-dl-" in tmp.name and time.time() - tmp.stat().st_mtime < max_age_s
    except FileNotFoundError:
        return False


def _complete(manifest: Any) -> bool:
    return isinstance(manifest, dict) and manifest.get("status") == "complete" \
        and "content_hash" in manifest


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s", path)
        return None


def touch(path: Path) -> None:
    try:
        Path(path).touch()
    except OSError as exc:  # a read-only store still serves reads
        log.debug("could not record last use at %s: %s", path, exc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
