"""Writing Ray Data outputs into a stage's entry, on any storage.

Ray Data's write tasks run on any node of the cluster. For a local (or shared) ``output_dir``
they write into the temporary entry directly. For an object-store ``output_dir`` the temporary
entry lives in the driver node's mirror, which other nodes cannot reach: the tasks write to a
staging prefix in the bucket (``store/<stage>/.train-<fp>-write-<rand>/``, next to the stage's
Ray Train storage), the driver downloads the files into the entry and deletes the prefix.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from tskd.storage import delete_dir, download_dir, is_remote, open_output

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
        dataset.write_parquet(staging)
        n = len(download_dir(fs, root, out))
        log.debug("%s: %d files written through %s", out, n, staging)
    finally:
        delete_dir(fs, root)
    return out
