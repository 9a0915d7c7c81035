"""The shared artifact store: hashing, atomic publish, concurrent and crashed builders, runs'
views, ``tskd store ls|du|gc``."""

import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from tskd import store as st
from tskd.cli import main

FP = "0123456789abcdef"


def _build_files(files, log_path=None, sleep=0.0, marker=None):
    """A builder writing ``files`` (name -> text); appends one line to ``log_path`` per run."""
    def build(tmp: Path):
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(f"{os.getpid()}\n")
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        if marker is not None:
            Path(marker).write_text("building")
        time.sleep(sleep)
        return {"stage": "s", "metrics": {"n": len(files)}}
    return build


# ---------------------------------------------------------------------------------- hashing

def test_content_hash_matches_a_hand_computed_sha256_and_ignores_bookkeeping(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    expected = hashlib.sha256(b"a.txt\0Fhello\0" + b"sub/b.bin\0F\x00\x01\0").hexdigest()
    assert st.content_hash(tmp_path) == expected
    (tmp_path / st.MANIFEST).write_text("{}")
    (tmp_path / st.LAST_USED).touch()
    assert st.content_hash(tmp_path) == expected
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x02")  # one byte differs
    assert st.content_hash(tmp_path) != expected


def test_content_hash_sees_renames(tmp_path):
    (tmp_path / "a").write_text("x")
    before = st.content_hash(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert st.content_hash(tmp_path) != before


def test_tree_and_file_identity_change_with_size_mtime_and_files(tmp_path):
    data = tmp_path / "ds"
    (data / "images").mkdir(parents=True)
    (data / "images" / "1.png").write_bytes(b"abc")
    ident = st.tree_identity(data)
    assert st.tree_identity(data) == ident
    os.utime(data / "images" / "1.png", ns=(1, 10**18))  # same size, new mtime
    assert st.tree_identity(data) != ident
    ident = st.tree_identity(data)
    (data / "images" / "2.png").write_bytes(b"")
    assert st.tree_identity(data) != ident
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"w" * 10)
    os.utime(ckpt, ns=(1, 5 * 10**18))
    ident = st.file_identity(ckpt)
    ref = hashlib.sha256(f"{ckpt.resolve()}\0{10}\0{5 * 10**18}".encode()).hexdigest()
    assert ident == ref
    os.utime(ckpt, ns=(1, 6 * 10**18))
    assert st.file_identity(ckpt) != ident


# ---------------------------------------------------------------------------------- resolve

def test_resolve_builds_once_then_reuses_and_records_last_use(tmp_path):
    store = st.Store(tmp_path / "store")
    log = tmp_path / "builds.log"
    entry, built = store.resolve("s", FP, _build_files({"out.txt": "1"}, log))
    assert built and entry.path == tmp_path / "store" / "s" / FP
    assert json.loads((entry.path / st.MANIFEST).read_text())["content_hash"] == \
        hashlib.sha256(b"out.txt\0F1\0").hexdigest()
    os.utime(entry.path / st.LAST_USED, (1000, 1000))
    again, built = store.resolve("s", FP, _build_files({"out.txt": "2"}, log))
    assert not built and again.path == entry.path and (entry.path / "out.txt").read_text() == "1"
    assert again.last_used() > 1000
    assert log.read_text().count("\n") == 1
    # force: rebuilt in place, new content hash
    forced, built = store.resolve("s", FP, _build_files({"out.txt": "2"}, log), force=True)
    assert built and forced.content_hash != entry.content_hash
    assert (entry.path / "out.txt").read_text() == "2"
    assert store.temporaries() == []


def test_force_reuses_an_entry_rebuilt_after_this_run_started(tmp_path):
    store = st.Store(tmp_path / "store")
    store.resolve("s", FP, _build_files({"x": "1"}))
    _, built = store.resolve("s", FP, _build_files({"x": "2"}), force=True,
                             rebuilt_after=time.time() - 60)
    assert not built


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    store = st.Store(tmp_path / "store")

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        store.resolve("s", FP, boom)
    assert store.get("s", FP) is None and store.entries() == []
    assert store.temporaries() == []


def test_a_stage_may_not_write_the_manifest(tmp_path):
    with pytest.raises(st.StoreError, match="manifest.json"):
        st.Store(tmp_path).resolve("s", FP, _build_files({st.MANIFEST: "{}"}))


# ---------------------------------------------------------------------------------- processes

def _race_worker(root, log_path, start, out):
    start.wait()
    entry, built = st.Store(Path(root)).resolve("s", FP, _build_files(
        {"out.txt": str(os.getpid())}, log_path, sleep=1.0))
    out.put((str(entry.path), entry.content_hash, built, entry.path.joinpath("out.txt")
             .read_text()))


def test_two_processes_racing_for_one_entry_build_it_once(tmp_path):
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_race_worker, args=(tmp_path / "store", log, start, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert log.read_text().count("\n") == 1  # the stage body ran once
    builder_pid = log.read_text().strip()
    assert sorted(r[2] for r in results) == [False, True]
    assert len({(r[0], r[1], r[3]) for r in results}) == 1  # same entry, same content
    assert results[0][3] == builder_pid


def _crash_worker(root, marker):
    st.Store(Path(root)).resolve("s", FP, _build_files({"big.bin": "partial"}, marker=marker,
                                                       sleep=60))


def test_a_killed_builder_leaves_no_entry_and_does_not_block_the_next(tmp_path):
    ctx = mp.get_context("fork")
    marker = tmp_path / "marker"
    proc = ctx.Process(target=_crash_worker, args=(tmp_path / "store", marker))
    proc.start()
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the builder never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    store = st.Store(tmp_path / "store", lock_timeout=10)
    assert store.get("s", FP) is None  # nothing looks complete
    assert len(store.temporaries()) == 1  # its half-built temporary entry
    t0 = time.time()
    entry, built = store.resolve("s", FP, _build_files({"big.bin": "whole"}))
    assert built and time.time() - t0 < 5  # the dead builder's lock did not hold us up
    assert (entry.path / "big.bin").read_text() == "whole"
    assert store.temporaries() == []  # its leftover was removed


def _hold_lock(root, ready):
    lock = st.Store(Path(root)).lock("s", FP)
    lock.acquire()
    ready.set()
    time.sleep(60)


def test_lock_timeout_names_the_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path / "store", ready))
    proc.start()
    try:
        assert ready.wait(30)
        store = st.Store(tmp_path / "store", lock_timeout=0.3)
        with pytest.raises(st.StoreError, match=f"held by {proc.pid} "):
            store.resolve("s", FP, _build_files({"x": "1"}))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)


# ---------------------------------------------------------------------------------- runs, gc

def _two_runs(tmp_path):
    """runs exp1 (s/a, t/b) and exp2 (s/a); entry s/c referenced by nobody."""
    store = st.Store(tmp_path / "store")
    a, _ = store.resolve("s", "a" * 16, _build_files({"x": "1" * 100}))
    b, _ = store.resolve("t", "b" * 16, _build_files({"y": "2" * 30}))
    c, _ = store.resolve("s", "c" * 16, _build_files({"z": "3" * 7}))
    st.record_use(tmp_path / "exp1", "s", a)
    st.record_use(tmp_path / "exp1", "t", b)
    st.record_use(tmp_path / "exp2", "s", a)
    return store, a, b, c


def test_record_use_writes_the_view_and_links(tmp_path):
    store, a, b, _ = _two_runs(tmp_path)
    view = json.loads((tmp_path / "exp1" / st.VIEW_FILE).read_text())["stages"]
    assert view["s"]["entry"] == f"../store/s/{'a' * 16}"
    assert view["t"]["content_hash"] == b.content_hash
    assert os.readlink(tmp_path / "exp1" / "s") == f"../store/s/{'a' * 16}"
    assert (tmp_path / "exp1" / "s" / "x").read_text() == "1" * 100
    # repointing replaces the link
    st.record_use(tmp_path / "exp1", "s", store.get("s", "c" * 16))
    assert (tmp_path / "exp1" / "s" / "z").is_file()
    assert st.read_view(tmp_path / "exp1")["s"]["fingerprint"] == "c" * 16


def test_garbage_is_what_no_run_references(tmp_path):
    store, a, b, c = _two_runs(tmp_path)
    assert st.referenced(tmp_path) == {("s", "a" * 16): ["exp1", "exp2"],
                                       ("t", "b" * 16): ["exp1"]}
    assert [e.fingerprint for e in st.garbage(store, tmp_path)] == ["c" * 16]
    (tmp_path / "exp1" / st.VIEW_FILE).write_text("{not json")
    with pytest.raises(st.StoreError, match="exp1/stages.json is unreadable"):
        st.garbage(store, tmp_path)


def test_remove_skips_an_entry_being_built(tmp_path):
    store, _, _, c = _two_runs(tmp_path)
    lock = store.lock("s", c.fingerprint)
    lock.acquire()
    try:
        assert not store.remove(c)
    finally:
        lock.release()
    assert store.remove(c) and not c.path.exists()


def test_cli_store_ls_du_gc(tmp_path, capsys):
    store, a, b, c = _two_runs(tmp_path)
    (tmp_path / "store" / "s" / f"{st.TMP_PREFIX}{'d' * 16}-1-ab").mkdir()  # a crashed build
    assert main(["store", "ls", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("s ", "t "))]
    assert len(lines) == 3
    row_a = next(ln for ln in lines if "a" * 16 in ln)
    assert "exp1,exp2" in row_a and f"{a.size()} B" in row_a
    assert "-" in next(ln for ln in lines if "c" * 16 in ln).split()[-1]  # referenced by nobody

    assert main(["store", "du", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sizes = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()}
    manifest_bytes = lambda e: (e.path / st.MANIFEST).stat().st_size  # noqa: E731
    assert sizes["s"][1] == "2"
    assert int(sizes["s"][2]) == 107 + manifest_bytes(a) + manifest_bytes(c)
    assert int(sizes["t"][2]) == 30 + manifest_bytes(b)

    assert main(["store", "gc", "--output-dir", str(tmp_path)]) == 0  # dry run
    out = capsys.readouterr().out
    assert "c" * 16 in out and "a" * 16 not in out and "dry run" in out
    assert c.path.exists()
    assert main(["store", "gc", "--output-dir", str(tmp_path), "--yes"]) == 0
    capsys.readouterr()
    assert not c.path.exists() and a.path.exists() and b.path.exists()
    assert store.temporaries() == []


def test_a_stage_directory_from_before_the_store_moves_aside(tmp_path):
    store = st.Store(tmp_path / "store")
    legacy = tmp_path / "exp" / "s"
    legacy.mkdir(parents=True)
    (legacy / "old.txt").write_text("old")
    entry, _ = store.resolve("s", FP, _build_files({"new.txt": "new"}))
    st.record_use(tmp_path / "exp", "s", entry)
    assert (tmp_path / "exp" / "s").is_symlink()
    assert (tmp_path / "exp" / "s" / "new.txt").read_text() == "new"
    moved = list((tmp_path / "exp" / ".pre-store").glob("s-*/old.txt"))
    assert [p.read_text() for p in moved] == ["old"]
