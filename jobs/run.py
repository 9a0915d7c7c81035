"""Entrypoint for `ray job submit`: runs a TS-KD experiment on the cluster it is submitted to.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/run.py jobs/demo.yaml [--set key=value ...]

Everything after the script name is `tskd run`'s arguments. Ray 2.60 clusters use token
authentication: the client needs RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else "Missing authentication token"; see
cluster/README.md. output_dir, the dataset and checkpoints must be on storage every node reads.
Inside a Ray job, `ray.init()` connects to the job's cluster (RAY_ADDRESS is set by Ray), so
nothing here names an address.
The exit status is `tskd run`'s: 0 done, 2 bad input (config, dataset, checkpoint; also when a
worker found it: one line naming the stage's error.log), 1 a failure with its traceback.
"""

import sys
from pathlib import Path

# The job's working directory is a copy of the repository; make `tskd` importable from it when
# it is not installed on the cluster's image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tskd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
