"""The ``--set`` overrides that make a whole ``tskd run`` tiny (32-px demo images, a ``sam_tiny``
teacher, a 16-px diffusion model, one-epoch students), shared by the end-to-end tests, and the
reader of a run written to an object store. Imported by bare name (pytest puts each test file's folder on
``sys.path``), as ``tests/report`` does."""


def tiny_overrides(*, n_images: int, num_workers: int, select: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The tiny pipeline's overrides, in order: ``experiment=tiny``, then ``select`` (which
    students and reference run), the tiny data/teacher/transfer/student settings with
    ``n_images`` demo images, then ``extra`` (stage settings the selection needs), then the Ray
    settings with ``num_workers`` training workers at half a CPU each."""
    return [
        "experiment=tiny", *select,
        f"data.demo.n_images={n_images}", "data.demo.size=32", "data.image_size=32",
        "data.n_labels=8", "data.val_share=0.25",
        "teacher.arch=sam_tiny", "teacher.img_size=32",
        "teacher.pretrain.steps=2", "teacher.pretrain.batch_size=2",
        "teacher.finetune.epochs=1", "teacher.finetune.batch_size=4",
        "transfer.n_images=8", "transfer.diffusion.image_size=16",
        "transfer.diffusion.n_augmented=8", "transfer.diffusion.train_steps=2",
        "transfer.diffusion.batch_size=4", "transfer.diffusion.num_inference_steps=2",
        "transfer.diffusion.block_out_channels=[32,32]",
        "transfer.sample_batch_size=4", "transfer.actor_cpus=0.5", "transfer.near_copy_psnr=99",
        "student.img_size=32", "student.patch_size=8", "student.decoder_dim=16",
        "distill.epochs=1", "distill.batch_size=4",
        "student_finetune.epochs=1", "student_finetune.batch_size=4",
        *extra,
        f"ray.num_workers={num_workers}", "ray.cpus_per_worker=0.5", "ray.torch_threads=1",
    ]


def bucket_objects(uri: str) -> dict[str, bytes]:
    """Every object of the bucket (container) of ``uri`` (``s3://bucket[/...]``,
    ``gs://bucket[/...]``, ``abfs://container@account.../...``), keyed by object key (directory
    markers left out). Read with the cloud's own client (boto3) or a pyarrow filesystem made
    here from the emulator's environment variables, not with the code under test."""
    import os

    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0].split("@", 1)[0]
    if scheme == "s3":
        import boto3

        client = boto3.client("s3")
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    out[obj["Key"]] = client.get_object(Bucket=bucket,
                                                        Key=obj["Key"])["Body"].read()
        return out
    import pyarrow.fs as pafs

    if scheme == "gs":
        fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=os.environ[
            "STORAGE_EMULATOR_HOST"].split("://", 1)[1])
    else:
        conn = dict(part.split("=", 1) for part in
                    os.environ["AZURE_STORAGE_CONNECTION_STRING"].split(";") if "=" in part)
        host = conn["BlobEndpoint"].split("://", 1)[1].split("/", 1)[0]
        fs = pafs.AzureFileSystem(account_name=conn["AccountName"],
                                  account_key=conn["AccountKey"], blob_storage_authority=host,
                                  blob_storage_scheme="http", dfs_storage_authority=host,
                                  dfs_storage_scheme="http")
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(bucket, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(bucket) + 1:]] = f.read()
    return out
