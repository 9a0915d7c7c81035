"""Entrypoint for `ray job submit`: runs a `tskd tune` search on the cluster it is submitted to.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/tune.py jobs/demo.yaml --space search_spaces/kd_weights.yaml [--set ...]

Everything after the script name is `tskd tune`'s arguments. Ray 2.60 clusters use token
authentication: the client needs RAY_AUTH_MODE=token and the cluster's token (cluster/README.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tskd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
