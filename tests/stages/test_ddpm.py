"""Stage ``ddpm`` (trained for real in ``test_transfer_set.py``'s fixture): where the transfer
stage's sampler actors load its model from."""

from pathlib import Path

from tskd.artifacts import StageContext
from tskd.config import load_config
from tskd.stages import ddpm


def test_the_samplers_load_the_model_from_the_ddpm_entry(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    entry = tmp_path / "store" / "ddpm" / "abc123"
    local = StageContext("transfer", tmp_path / "t", {"data": tmp_path, "ddpm": entry}, cfg)
    assert ddpm.model_location(local) == entry / "model"
    # an object-store output: the entry's URI (every node's actors download it), never the
    # driver's mirror path
    uri = "s3://bucket/runs/store/ddpm/abc123"
    remote = StageContext("transfer", tmp_path / "t", {"data": tmp_path, "ddpm": entry}, cfg,
                          remote_inputs={"ddpm": uri})
    assert ddpm.model_location(remote) == "s3://bucket/runs/store/ddpm/abc123/model"
    assert not isinstance(ddpm.model_location(remote), Path)
