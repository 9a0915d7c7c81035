"""Object-store outputs: tskd.storage and the store on S3, GCS and Azure (moto's server,
gcp-storage-emulator and Azurite on 127.0.0.1)."""

import json
import sys
from pathlib import Path

import pytest

PLANTED_SECRET = "planted-secret-7f3a9c"  # tests/conftest.py plants it (s3 fixture)
from tskd import storage
from tskd.config import ConfigError, load_config
from tskd.store import Store, StoreError

sys.path.insert(0, str(Path(__file__).resolve().parent / "stages"))
from tiny_pipeline import bucket_objects  # noqa: E402


def _objects(uri: str) -> dict[str, bytes]:
    """Every object under ``<scheme>://bucket[/prefix]`` (keys without the bucket), read with
    the cloud's client or a filesystem made from the emulator's address, not tskd."""
    prefix = uri.split("://", 1)[1].partition("/")[2]
    return {k: v for k, v in bucket_objects(uri).items() if k.startswith(prefix)}


@pytest.fixture(params=["s3", "gcs", "azure"])
def bucket(request):
    """An empty bucket (container) on each object store's local emulator: the URI."""
    return request.getfixturevalue(request.param)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


FILES = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 3, "sub/deep/c.json": b"{}"}


def _builder(calls: list, files=FILES):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        return {"stage": "s", "metrics": {"x": 1}}
    return build


def test_upload_and_download_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    for rel, data in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    fs, root = storage.open_output(f"{bucket}/pre/fix/")
    name = bucket.split("://")[1].split("@")[0]  # abfs://container@account...: the container
    assert root == name + "/pre/fix"
    storage.upload_dir(src, fs, storage.join(root, "t"))
    assert _objects(bucket) == {f"pre/fix/t/{k}": v for k, v in FILES.items()}
    assert storage.download_dir(fs, storage.join(root, "t"), tmp_path / "dst") == sorted(FILES)
    assert _tree(tmp_path / "dst") == FILES
    assert storage.list_files(fs, f"{name}/nothing") == []
    assert storage.read_json(fs, f"{name}/none.json") is None
    storage.write_json(fs, f"{name}/x.json", {"k": [1, 2]})
    assert json.loads(_objects(bucket)["x.json"]) == {"k": [1, 2]}


def test_upload_puts_the_named_files_last(tmp_path):
    class Recorder:  # a filesystem that records the order objects are written in
        def __init__(self):
            self.order = []

        def open_output_stream(self, path):
            self.order.append(path)
            import io

            class _W(io.BytesIO):
                def __exit__(self, *a):
                    return False
            return _W()

    for rel in ("manifest.json", "z.bin", "a/b.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    (tmp_path / ".last_used").touch()
    fs = Recorder()
    storage.upload_dir(tmp_path, fs, "bkt/e", last=["manifest.json"], skip=[".last_used"])
    assert fs.order == ["bkt/e/a/b.txt", "bkt/e/z.bin", "bkt/e/manifest.json"]


def test_symlinks_are_refused(bucket, tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to("f")
    fs, root = storage.open_output(bucket)
    with pytest.raises(ValueError, match="symlinks"):
        storage.upload_dir(tmp_path, fs, root)


def test_store_on_an_object_store_builds_once_and_other_nodes_download(bucket, tmp_path):
    uri = f"{bucket}/runs"
    node_a = Store.for_output_dir(uri, tmp_path / "mirror-a")
    calls: list = []
    entry, built = node_a.resolve("s", "fp1", _builder(calls))
    assert built and len(calls) == 1
    assert entry.path.is_relative_to(tmp_path / "mirror-a")
    objects = _objects(uri)
    assert {k for k in objects} == {f"runs/store/s/fp1/{k}" for k in [*FILES, "manifest.json"]}
    manifest = json.loads(objects["runs/store/s/fp1/manifest.json"])
    assert manifest["status"] == "complete" and manifest["metrics"] == {"x": 1}

    again, built = node_a.resolve("s", "fp1", _builder(calls))
    assert not built and len(calls) == 1 and again.path == entry.path

    node_b = Store.for_output_dir(uri, tmp_path / "mirror-b")  # another node: empty mirror
    got, built = node_b.resolve("s", "fp1", _builder(calls))
    assert not built and len(calls) == 1
    assert got.path.is_relative_to(tmp_path / "mirror-b")
    assert {k: v for k, v in _tree(got.path).items() if not k.startswith(".")} == \
        {**FILES, "manifest.json": objects["runs/store/s/fp1/manifest.json"]}
    assert got.content_hash == entry.content_hash


def test_a_failed_build_publishes_nothing(bucket, tmp_path):
    uri = f"{bucket}/runs"
    store = Store.for_output_dir(uri, tmp_path / "m")

    def crash(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"...")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        store.resolve("s", "fp1", crash)
    assert _objects(uri) == {}
    assert store.get("s", "fp1") is None


def test_an_interrupted_upload_never_looks_complete(bucket, tmp_path, monkeypatch):
    uri = f"{bucket}/runs"
    real = storage.upload_file
    sent: list = []

    def dies_after_two(local, fs, dest):
        if len(sent) == 2:
            raise ConnectionError("network gone")
        sent.append(dest)
        real(local, fs, dest)

    monkeypatch.setattr(storage, "upload_file", dies_after_two)
    node_a = Store.for_output_dir(uri, tmp_path / "a")
    calls: list = []
    with pytest.raises(ConnectionError):
        node_a.resolve("s", "fp1", _builder(calls))
    monkeypatch.setattr(storage, "upload_file", real)
    left = _objects(uri)
    assert len(left) == 2 and not any(k.endswith("manifest.json") for k in left)
    node_b = Store.for_output_dir(uri, tmp_path / "b")
    assert node_b.get("s", "fp1") is None  # files without a manifest: not an entry

    # the builder's node still has its complete copy: the next resolve uploads it, no rebuild
    entry, built = node_a.resolve("s", "fp1", _builder(calls))
    assert len(calls) == 1 and not built
    assert set(_objects(uri)) == {f"runs/store/s/fp1/{k}" for k in [*FILES, "manifest.json"]}
    assert node_b.get("s", "fp1").content_hash == entry.content_hash


def test_leftovers_of_a_crashed_upload_are_replaced(bucket, tmp_path):
    uri = f"{bucket}/runs"
    fs, root = storage.open_output(uri)
    storage.write_bytes(fs, f"{root}/store/s/fp1/stale.bin", b"from a crashed builder")
    calls: list = []
    entry, built = Store.for_output_dir(uri, tmp_path / "m").resolve("s", "fp1", _builder(calls))
    assert built
    assert "runs/store/s/fp1/stale.bin" not in _objects(uri)


def test_force_replaces_the_remote_entry(bucket, tmp_path):
    uri = f"{bucket}/runs"
    store = Store.for_output_dir(uri, tmp_path / "m")
    calls: list = []
    first, _ = store.resolve("s", "fp1", _builder(calls))
    second, built = store.resolve("s", "fp1", _builder(calls, {"new.txt": b"v2"}), force=True)
    assert built and second.content_hash != first.content_hash
    assert set(_objects(uri)) == {"runs/store/s/fp1/new.txt", "runs/store/s/fp1/manifest.json"}
    other = Store.for_output_dir(uri, tmp_path / "other").get("s", "fp1")
    assert other.content_hash == second.content_hash
    assert (other.path / "new.txt").read_bytes() == b"v2"


def test_a_corrupt_remote_entry_is_not_used(bucket, tmp_path):
    uri = f"{bucket}/runs"
    Store.for_output_dir(uri, tmp_path / "a").resolve("s", "fp1", _builder([]))
    fs, root = storage.open_output(uri)
    storage.write_bytes(fs, f"{root}/store/s/fp1/a.txt", b"tampered")
    with pytest.raises(StoreError, match="content hash"):
        Store(tmp_path / "b" / "store", remote=Store.for_output_dir(uri, tmp_path / "b").remote
              )._download("s", "fp1", attempts=1)


def test_run_views_go_to_the_remote_and_come_back(bucket, tmp_path):
    uri = f"{bucket}/runs"
    node_a = Store.for_output_dir(uri, tmp_path / "a")
    entry, _ = node_a.resolve("s", "fp1", _builder([]))
    run_a = node_a.output_dir / "exp"
    node_a.record_run(run_a, "s", entry)
    (run_a / "results.json").write_text('{"dice": 0.5}')
    node_a.push_run_file(run_a, "results.json")
    view = json.loads(_objects(uri)["runs/exp/stages.json"])
    assert view["stages"]["s"]["fingerprint"] == "fp1"
    assert view["stages"]["s"]["entry"] == "../store/s/fp1"
    node_b = Store.for_output_dir(uri, tmp_path / "b")
    run_b = node_b.output_dir / "exp"
    node_b.pull_run(run_b)
    assert json.loads((run_b / "stages.json").read_text()) == view
    assert json.loads((run_b / "results.json").read_text()) == {"dice": 0.5}


def test_credentials_are_not_written(s3, tmp_path):
    store = Store.for_output_dir(f"{s3}/runs", tmp_path / "m")
    store.resolve("s", "fp1", _builder([]))
    for key, data in _objects(s3).items():
        assert PLANTED_SECRET.encode() not in data, key
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or PLANTED_SECRET.encode() not in path.read_bytes(), path


def test_output_dir_uris_in_the_config(tmp_path):
    cfg = load_config(None, ["output_dir=s3://bucket/runs", f"mirror_dir={tmp_path}",
                             "experiment=e"])
    assert cfg.run_dir == storage.mirror_root("s3://bucket/runs", tmp_path) / "e"
    assert cfg.run_dir.parent.parent == tmp_path.resolve()
    assert storage.mirror_root("s3://bucket/runs/", tmp_path) == \
        storage.mirror_root("s3://bucket/runs", tmp_path)
    assert load_config(None, ["output_dir=gs://b/p"]).output_dir == "gs://b/p"
    local = load_config(None, [f"output_dir={tmp_path / 'r'}", "experiment=e"])
    assert local.run_dir == (tmp_path / "r" / "e").resolve()
    with pytest.raises(ConfigError, match=r"output_dir: invalid value 'ftp://host/x'.*s3://"):
        load_config(None, ["output_dir=ftp://host/x"])
    with pytest.raises(ConfigError, match=r"output_dir: invalid value 's3://'"):
        load_config(None, ["output_dir=s3://"])
    with pytest.raises(ConfigError, match="mirror_dir"):
        load_config(None, ["mirror_dir=s3://b/m"])


def test_a_worker_on_another_node_fetches_the_stage_inputs(bucket, tmp_path):
    from tskd.artifacts import StageContext
    from tskd.config import ExperimentConfig
    from tskd.stages.ray_train import fetch_then_train
    from tskd.store import InputRefs

    uri = f"{bucket}/runs"
    driver = Store.for_output_dir(uri, tmp_path / "driver")
    entry, _ = driver.resolve("data", "fp1", _builder([]))
    refs = InputRefs(uri, str(tmp_path / "node-b"), (("data", "fp1"),))
    node_b_path = Store.for_output_dir(uri, tmp_path / "node-b").entry_dir("data", "fp1")
    seen = {}

    def loop(config):  # what a Ray Train worker's loop would read
        seen["files"] = _tree(Path(config["data_dir"]))

    fetch_then_train(loop, refs, {"data_dir": str(node_b_path)})
    assert {k: v for k, v in seen["files"].items() if k in FILES} == FILES
    assert refs.uri("data", "fp1") == f"{uri}/store/data/fp1"

    ctx = StageContext("s", tmp_path, {"data": entry.path}, ExperimentConfig(),
                       remote_inputs={"data": refs.uri("data", "fp1")})
    assert ctx.input_location("data") == f"{uri}/store/data/fp1"
    assert StageContext("s", tmp_path, {"data": entry.path},
                        ExperimentConfig()).input_location("data") == entry.path
    with pytest.raises(StoreError, match="no complete entry"):
        InputRefs(uri, str(tmp_path / "c"), (("data", "missing"),)).fetch()


def test_ray_train_storage_on_an_object_store(bucket, tmp_path):
    """Ray Train gets tskd's filesystem for the bucket and the path inside it, so Ray reaches
    each store (the emulators' addresses included) exactly as tskd does."""
    from tskd.artifacts import StageContext
    from tskd.config import ExperimentConfig
    from tskd.stages.ray_train import run_storage, train_storage

    ctx = StageContext("s", tmp_path, {}, ExperimentConfig(),
                       train_dir=f"{bucket}/runs/store/s/.train-fp")
    assert run_storage(ctx) == f"{bucket}/runs/store/s/.train-fp"
    remote = train_storage(run_storage(ctx))
    name = bucket.split("://")[1].split("@")[0]
    assert remote["storage_path"] == f"{name}/runs/store/s/.train-fp"
    fs = remote["storage_filesystem"]
    assert type(fs).__name__ == {"s3": "S3FileSystem", "gs": "GcsFileSystem",
                                 "abfs": "AzureFileSystem"}[bucket.split("://")[0]]
    with fs.open_output_stream(f"{remote['storage_path']}/probe") as f:
        f.write(b"ray")
    assert _objects(bucket) == {"runs/store/s/.train-fp/probe": b"ray"}
    local = StageContext("s", tmp_path, {}, ExperimentConfig(), train_dir=tmp_path / "t")
    assert run_storage(local) == tmp_path / "t"
    assert train_storage("rel") == {"storage_path": str(Path("rel").resolve())}


def test_commands_that_want_a_local_output_dir_say_so(tmp_path, capsys):
    from tskd.cli import main
    from tskd.grid import load_grid
    from tskd.tune import check_fresh

    assert main(["store", "ls", "--output-dir", "s3://bucket/runs"]) == 2
    assert "local output directories only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"output_dir: invalid value 's3://b/r'.*tskd tune"):
        check_fresh(load_config(None, ["output_dir=s3://b/r"]), resume=False)
    grid = tmp_path / "g.yaml"
    grid.write_text("axes:\n  methods: [scratch]\n")
    with pytest.raises(ConfigError, match=r"output_dir: invalid value 's3://b/r'.*tskd grid"):
        load_grid(grid, ["output_dir=s3://b/r"])


def test_driver_directories_reach_actors_through_the_bucket(bucket, tmp_path):
    from tskd.stages.outputs import local_copy, shared_dir

    model = tmp_path / "model"
    for rel, data in FILES.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes(data)
    with shared_dir(model, tmp_path / "train") as where:  # a local output: the path itself
        assert where == str(model) and local_copy(where) == model
    train_dir = f"{bucket}/runs/store/transfer/.train-fp"
    with shared_dir(model, train_dir) as where:
        assert where.startswith(f"{train_dir}-share-")
        assert _tree(local_copy(where)) == FILES  # what an actor on another node loads
    assert _objects(bucket) == {}  # the staging copy is gone


def test_two_nodes_building_one_entry_the_first_manifest_wins(bucket, tmp_path):
    uri = f"{bucket}/runs"
    node_a = Store.for_output_dir(uri, tmp_path / "a")
    node_b = Store.for_output_dir(uri, tmp_path / "b")
    published = {}

    def slow_build_on_b(tmp: Path) -> dict:  # node A publishes while node B is still building
        published["a"], _ = node_a.resolve("s", "fp1", _builder([], {"w.bin": b"from A"}))
        return _builder([], {"w.bin": b"from B"})(tmp)

    entry, built = node_b.resolve("s", "fp1", slow_build_on_b)
    assert built
    assert entry.content_hash == published["a"].content_hash
    assert (entry.path / "w.bin").read_bytes() == b"from A"  # B's own copy was discarded
    assert _objects(uri)["runs/store/s/fp1/w.bin"] == b"from A"


def _account_sas(account: str, key: str) -> str:
    """An account shared access signature for the Blob service, signed as Azure's REST
    reference defines it (version 2021-08-06: the string to sign ends with the encryption
    scope), not with tskd's code."""
    import base64
    import hashlib
    import hmac
    from urllib.parse import quote

    fields = {"sv": "2021-08-06", "ss": "b", "srt": "sco", "sp": "rwdlac",
              "se": "2099-01-01T00:00:00Z", "spr": "https,http"}
    to_sign = "\n".join([account, fields["sp"], fields["ss"], fields["srt"], "", fields["se"],
                         "", fields["spr"], fields["sv"], "", ""])
    signature = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(),
                                          hashlib.sha256).digest()).decode()
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items()) + \
        f"&sig={quote(signature, safe='')}"


def test_azure_with_a_shared_access_signature_and_the_uri_account(azure, monkeypatch):
    """A connection string with a SAS instead of the account key writes to the container; the
    account comes from its BlobEndpoint. A URI naming another account, and a string without a
    credential, fail naming what is wrong and never a credential's value."""
    import os

    with_key = os.environ["AZURE_STORAGE_CONNECTION_STRING"]  # the fixture's, with the key
    fields = dict(p.split("=", 1) for p in with_key.split(";") if "=" in p)
    endpoint, account = fields["BlobEndpoint"], fields["AccountName"]
    sas = _account_sas(account, fields["AccountKey"])
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       f"BlobEndpoint={endpoint};SharedAccessSignature={sas}")
    fs, root = storage.open_output(f"{azure}/sas")
    storage.write_json(fs, storage.join(root, "x.json"), {"via": "sas"})
    assert storage.read_json(fs, storage.join(root, "x.json")) == {"via": "sas"}
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", with_key)  # the reference reader's
    assert json.loads(_objects(azure)["sas/x.json"]) == {"via": "sas"}
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       f"BlobEndpoint={endpoint};SharedAccessSignature=?{sas}")  # portal style
    portal_fs, _ = storage.open_output(azure)
    assert storage.read_json(portal_fs, storage.join(root, "x.json")) == {"via": "sas"}

    container = azure.split("://")[1].split("@")[0]
    with pytest.raises(ValueError, match="names the storage account 'other', but "
                                         "AZURE_STORAGE_CONNECTION_STRING is for "
                                         f"'{account}'"):
        storage.open_output(f"abfs://{container}@other.dfs.core.windows.net/p")
    storage.open_output(f"az://{container}/p")  # no account in the URI: the string's

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       f"AccountName={account};BlobEndpoint={endpoint}")
    with pytest.raises(ValueError, match=r"no credential \(AccountKey, or SharedAccessSignature; "
                                         r"it names AccountName, BlobEndpoint\)"):
        storage.open_output(azure)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", f"SharedAccessSignature={sas}")
    with pytest.raises(ValueError, match="names no storage account") as err:
        storage.open_output(azure)
    assert "sig=" not in str(err.value)
