"""Where ``output_dir`` lives: a local directory, or an object store (``s3://``, ``gs://``,
``abfs://``) reached through a pyarrow filesystem.

A local ``output_dir`` (a path, a shared mount) is used as it is: nothing here runs for it. For a
URI, :func:`open_output` gives the pyarrow filesystem and the root path inside it
(``pyarrow.fs.FileSystem.from_uri``; an fsspec filesystem wrapped for pyarrow where pyarrow has
none for the scheme). Credentials and endpoints come only from the environment and the
filesystem's usual configuration (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_ENDPOINT_URL``, ``~/.aws``, Google's application-default credentials, Azure's
``AZURE_STORAGE_*``), never from tskd configs, and nothing here writes or logs them.

Each node keeps a local mirror of the remote output (:func:`mirror_root`,
``<mirror_dir>/<sha256(uri)[:16]>/``, the same layout as a local ``output_dir``): the store
(:mod:`tskd.store`) downloads entries into it and builds there before uploading. The helpers
below copy trees and small JSON files between the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")
"""URI schemes ``output_dir`` may use (anything else with ``://`` is refused)."""
_CHUNK = 8 << 20


def scheme(uri: str) -> str | None:
    """``"s3"`` for ``s3://bucket/prefix``; None for a local path (``file://`` included)."""
    if "://" not in str(uri):
        return None
    s = str(uri).split("://", 1)[0].lower()
    return None if s == "file" else s


def is_remote(uri: str | Path) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ``abfs://``...)."""
    return scheme(str(uri)) is not None


def local_path(uri: str | Path) -> Path:
    """A local ``output_dir`` (or ``file://`` URI) as an absolute path."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser().resolve()


def mirror_root(uri: str, mirror_dir: str | Path) -> Path:
    """This node's local mirror of the remote output ``uri``: ``<mirror_dir>/<sha[:16]>``.
    The directory name depends on the URI only (trailing slashes ignored), so every process on
    a node shares one mirror."""
    key = hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]
    return Path(mirror_dir).expanduser().resolve() / key


def open_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of an object-store URI and the root path inside it (no scheme, no
    trailing slash), e.g. ``(S3FileSystem, "bucket/prefix")``. Credentials: the environment
    and the filesystem's own configuration only.

    Two environment variables of the clouds' own SDKs are honoured where pyarrow's URI parsing
    does not read them: ``STORAGE_EMULATOR_HOST`` (``gs://``: a GCS emulator such as
    ``gcp-storage-emulator``, reached anonymously) and ``AZURE_STORAGE_CONNECTION_STRING``
    (``abfs://`` / ``az://``: account, key or shared access signature, and endpoints, e.g.
    Azurite's). Every Ray call that touches the output (Train storage, Data reads and writes)
    gets this filesystem, so the driver, the workers and Ray itself reach the same store the
    same way."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs = _from_environment(str(uri))
    if fs is not None:
        return fs, _bucket_path(str(uri))
    try:
        fs, root = pafs.FileSystem.from_uri(str(uri))
    except (pa.lib.ArrowInvalid, pa.lib.ArrowNotImplementedError, ValueError) as exc:
        try:  # e.g. abfs:// on a pyarrow built without Azure: fsspec (adlfs) if installed
            import fsspec

            fsspec_fs, root = fsspec.core.url_to_fs(str(uri))
        except (ImportError, ValueError) as exc2:
            raise ValueError(f"cannot open {uri}: {exc} / {exc2}") from exc
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return fs, root.rstrip("/")


def _bucket_path(uri: str) -> str:
    """``bucket/prefix`` of ``gs://bucket/prefix``, ``container/prefix`` of
    ``abfs://container@account.dfs.core.windows.net/prefix`` or ``az://container/prefix``."""
    rest = uri.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    bucket = netloc.split("@", 1)[0]
    return join(bucket, path) if path.strip("/") else bucket


def _from_environment(uri: str) -> pafs.FileSystem | None:
    """The filesystem the SDK environment variables above configure for ``uri``, or None."""
    import pyarrow.fs as pafs

    kind = scheme(uri)
    if kind in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
        host = os.environ["STORAGE_EMULATOR_HOST"]
        url_scheme, _, authority = host.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, scheme=url_scheme or "http",
                                  endpoint_override=authority.rstrip("/"))
    if kind in ("abfs", "abfss", "az") and os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        return _azure_from_connection_string(uri, os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    return None


def _azure_from_connection_string(uri: str, connection_string: str) -> pafs.FileSystem:
    """An ``AzureFileSystem`` from an Azure Storage connection string: the account key
    (``AccountName`` + ``AccountKey``) or a shared access signature (``SharedAccessSignature``
    with ``BlobEndpoint``, which names the account), and the endpoints it names (an emulator's).
    The account in an ``abfs://container@account...`` URI must be the string's. Errors name the
    fields, never their values."""
    import pyarrow.fs as pafs

    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    named = ", ".join(sorted(fields)) or "nothing"
    blob_endpoint = fields.get("BlobEndpoint")
    account = fields.get("AccountName") or (_endpoint_account(blob_endpoint)
                                            if blob_endpoint else None)
    if not account:
        raise ValueError("AZURE_STORAGE_CONNECTION_STRING names no storage account (AccountName, "
                         f"or a BlobEndpoint; it names {named})")
    credential: dict[str, str] = {}
    if fields.get("AccountKey"):
        credential["account_key"] = fields["AccountKey"]
    elif fields.get("SharedAccessSignature"):
        # Arrow appends the token to the account URL as is: it must start with "?", which
        # connection strings leave out and the portal's tokens include.
        credential["sas_token"] = "?" + fields["SharedAccessSignature"].lstrip("?")
    else:
        raise ValueError("AZURE_STORAGE_CONNECTION_STRING has no credential (AccountKey, or "
                         f"SharedAccessSignature; it names {named})")
    in_uri = _uri_account(uri)
    if in_uri is not None and in_uri != account:
        raise ValueError(f"{uri} names the storage account {in_uri!r}, but "
                         f"AZURE_STORAGE_CONNECTION_STRING is for {account!r}")
    options: dict[str, str] = {}
    for service in ("blob", "dfs"):
        endpoint = fields.get(f"{service.capitalize()}Endpoint") or blob_endpoint
        if endpoint:  # e.g. http://127.0.0.1:10000/devstoreaccount1 (an emulator)
            url_scheme, _, rest = endpoint.partition("://")
            options[f"{service}_storage_scheme"] = url_scheme
            options[f"{service}_storage_authority"] = rest.split("/", 1)[0]
    return pafs.AzureFileSystem(account_name=account, **credential, **options)


def _endpoint_account(endpoint: str) -> str | None:
    """The account a blob endpoint serves: the first path segment of an emulator's
    (``http://127.0.0.1:10000/devstoreaccount1``), else the host's first label
    (``https://account.blob.core.windows.net``)."""
    host, _, path = endpoint.partition("://")[2].partition("/")
    return path.strip("/").split("/", 1)[0] or host.split(".", 1)[0] or None


def _uri_account(uri: str) -> str | None:
    """The account of ``abfs://container@account.dfs.core.windows.net/...``; None where the URI
    names none (``az://container/...``)."""
    netloc = uri.split("://", 1)[1].partition("/")[0]
    return netloc.split("@", 1)[1].split(".", 1)[0] if "@" in netloc else None


def join(*parts: str) -> str:
    """A path inside a filesystem from its parts (always ``/``-separated)."""
    return posixpath.join(*[p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts)])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths relative to ``root`` of every file under it (sorted; empty if none)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(posixpath.relpath(i.path, root) for i in infos
                  if i.type == pafs.FileType.File)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    """A small JSON file, or None if it does not exist or does not parse."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if not exists(fs, path):
            return None
        log.warning("ignoring unreadable %s (%s)", path, type(exc).__name__)
        return None


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One object (object stores write it whole or not at all)."""
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(fs: pafs.FileSystem, path: str, data: Any) -> None:
    write_bytes(fs, path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def upload_file(local: Path, fs: pafs.FileSystem, dest: str) -> None:
    with open(local, "rb") as src, fs.open_output_stream(dest) as out:
        while chunk := src.read(_CHUNK):
            out.write(chunk)


def upload_dir(local: Path, fs: pafs.FileSystem, dest: str, *, last: Iterable[str] = (),
               skip: Iterable[str] = ()) -> list[str]:
    """Copy every file under ``local`` to ``dest`` (relative paths kept); the files named in
    ``last`` (relative paths, e.g. the manifest) go after all others, so a reader that waits
    for them never sees a partial tree. Symlinks are refused (object stores have none).
    Returns the relative paths uploaded."""
    local = Path(local)
    last, skip = list(last), set(skip)
    rels = []
    for dirpath, dirnames, filenames in os.walk(local):
        base = Path(dirpath)
        for name in dirnames + filenames:
            if (base / name).is_symlink():
                raise ValueError(f"{base / name}: symlinks cannot be stored on an object store")
        rels += [(base / n).relative_to(local).as_posix() for n in filenames]
    rels = sorted(r for r in rels if r not in skip and r not in last)
    rels += [r for r in last if (local / r).is_file()]
    for rel in rels:
        upload_file(local / rel, fs, join(dest, rel))
    return rels


def download_dir(fs: pafs.FileSystem, src: str, local: Path) -> list[str]:
    """Copy every file under ``src`` into ``local`` (created); returns the relative paths."""
    local = Path(local)
    rels = list_files(fs, src)
    for rel in rels:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.dl-{secrets.token_hex(4)}")
        with fs.open_input_stream(join(src, rel)) as f, open(tmp, "wb") as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
        os.replace(tmp, target)
    return rels


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Remove ``path`` and everything under it (nothing if it does not exist)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.Directory:
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            # GCS: the objects are deleted, then the directory's marker object, which
            # pyarrow never wrote for a prefix made by uploading files
            if list_files(fs, path):
                raise
    elif exists(fs, path):
        fs.delete_file(path)


def remove_tree(path: str | Path) -> None:
    """Delete a directory tree, local path or object-store URI (errors ignored: cleanup)."""
    if is_remote(str(path)):
        try:
            fs, root = open_output(str(path))
            delete_dir(fs, root)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def tree_exists(path: str | Path) -> bool:
    """True if a directory (local) or any object under the prefix (remote) exists."""
    if is_remote(str(path)):
        fs, root = open_output(str(path))
        return bool(list_files(fs, root))
    return Path(path).is_dir()
