"""Annotate SA-1B shards: python workflows/annotate.py [--config job.yaml] [--input ...] [--output ...] [--set k=v]

The same as ``sculpt run``, for ``ray job submit --working-dir . -- python workflows/annotate.py --config job.yaml``.
With no input given it runs the demo: sample shards from scikit-image photographs and the tiny offline models
on the CPU, output in sculpt-demo/. Rerunning the same command resumes: committed shards are not read again.
"""

import os
import sys

# `ray job submit --working-dir .` runs this file from an unpacked copy of the checkout, where sculpt is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sculpt import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["run", *sys.argv[1:]]))
