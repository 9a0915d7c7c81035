"""Ray Data outputs into a stage's entry, and driver-side directories to Ray actors, on any
storage.

Ray Data's write tasks run on any node of the cluster. For a local (or shared) ``output_dir``
they write into the temporary entry directly. For an object-store ``output_dir`` the temporary
entry lives in the driver node's mirror, which other nodes cannot reach: the tasks write to a
staging prefix in the bucket (``store/<stage>/.train-<fp>-write-<rand>/``, next to the stage's
Ray Train storage), the driver downloads the files into the entry and deletes the prefix.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tskd.storage import delete_dir, download_dir, is_remote, open_output, upload_dir

log = logging.getLogger(__name__)


def write_parquet(dataset: Any, out: Path, train_dir: Path | str | None) -> Path:
    """``dataset.write_parquet`` into the directory ``out`` inside a temporary entry; returns
    ``out``.

    Args:
        dataset: a ``ray.data.Dataset``.
        out: the directory inside the entry (e.g. ``<ctx.dir>/images``; files are added).
        train_dir: the stage's ``run_storage(ctx)``: a URI on an object-store output (the
            staging prefix goes next to it), else unused.
    """
    out = Path(out)
    if not is_remote(str(train_dir or "")):
        dataset.write_parquet(str(out))
        return out
    staging = f"{str(train_dir).rstrip('/')}-write-{secrets.token_hex(4)}"
    fs, root = open_output(staging)
    try:
        dataset.write_parquet(root, filesystem=fs)
        n = len(download_dir(fs, root, out))
        log.debug("%s: %d files written through %s", out, n, staging)
    finally:
        delete_dir(fs, root)
    return out


@contextlib.contextmanager
def shared_dir(local: Path, train_dir: Path | str | None) -> Iterator[str]:
    """Where Ray tasks and actors on any node read the driver's directory ``local`` (e.g. a
    model in the temporary entry): ``local`` itself, or for an object-store output a copy in a
    staging prefix next to ``train_dir``, deleted on exit. Readers use :func:`local_copy`."""
    if not is_remote(str(train_dir or "")):
        yield str(local)
        return
    staging = f"{str(train_dir).rstrip('/')}-share-{secrets.token_hex(4)}"
    fs, root = open_output(staging)
    try:
        upload_dir(Path(local), fs, root)
        yield staging
    finally:
        delete_dir(fs, root)


def local_copy(location: str | Path) -> Path:
    """A directory given by :func:`shared_dir` on this node: the path itself, or a URI's files
    downloaded into a new temporary directory."""
    if not is_remote(str(location)):
        return Path(location)
    fs, root = open_output(str(location))
    out = Path(tempfile.mkdtemp(prefix="tskd-shared-"))
    download_dir(fs, root, out)
    return out
