"""Entrypoint for `ray job submit`: runs an experiment grid on the cluster it is submitted to.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/grid.py jobs/paper_ph2.yaml [--set key=value ...]

Everything after the script name is `tskd grid`'s arguments. The exit status is `tskd grid`'s:
0 every cell done, 1 some cell failed (its error is in <output_dir>/<name>-grid/errors/; the
same command retries only the unfinished cells), 2 bad input.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from tskd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
