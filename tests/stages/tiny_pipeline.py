"""The ``--set`` overrides that make a whole ``tskd run`` tiny (32-px demo images, a ``sam_tiny``
teacher, a 16-px diffusion model, one-epoch students), shared by the end-to-end tests, and the
reader of a run written to S3. Imported by bare name (pytest puts each test file's folder on
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
    """Every object of the bucket of ``uri`` (``s3://bucket``), read with boto3 from the
    environment's endpoint and keys, keyed by object key (directory markers left out)."""
    import boto3

    bucket = uri[len("s3://"):]
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                out[obj["Key"]] = client.get_object(Bucket=bucket,
                                                    Key=obj["Key"])["Body"].read()
    return out
