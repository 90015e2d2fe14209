"""Annotate SA-1B shards: python workflows/annotate.py [--config job.yaml] [--input ...] [--output ...] [--set k=v]

The same as ``sculpt run``, for ``ray job submit --working-dir . -- python workflows/annotate.py --config job.yaml``.
With no input given it runs the demo: sample shards from scikit-image photographs and the tiny offline models
on the CPU, output in sculpt-demo/. Rerunning the same command resumes: committed shards are not read again.
"""

import sys

from sculpt import cli  # installed (make install, the Docker image), or the working directory of `ray job submit`

if __name__ == "__main__":
    sys.exit(cli.main(["run", *sys.argv[1:]]))
