"""Annotate SA-1B shards: python workflows/annotate.py [--config job.yaml] [--input ...] [--output ...] [--set k=v]

Runs on a new local Ray, or on a cluster through
``ray job submit --working-dir . -- python workflows/annotate.py --config job.yaml``.
With no input given it runs the demo: sample shards made from scikit-image photographs, output in sculpt-demo/.
Rerunning the same command resumes: committed shards are skipped without being read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, too

from sculpt import config as job_config
from sculpt import output, pipeline, samples

DEMO_DIR = "sculpt-demo"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (see workflows/annotate.yaml)")
    parser.add_argument("--input", action="append", help="shard file, directory, glob or s3:// prefix (repeatable)")
    parser.add_argument("--output", help="output directory or s3:// prefix")
    parser.add_argument("--overwrite", action="store_true", help="delete output written with another config and start over")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. input.readers=4")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.shards={json.dumps(args.input)}")
    if args.output:
        overrides.append(f"output.path={json.dumps(args.output)}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.s3_endpoint:
        overrides.append(f"s3.endpoint={json.dumps(args.s3_endpoint)}")
    try:
        config = job_config.load(args.config, overrides)
        if not config.input.shards:  # the demo: bundled sample shards, local output
            shard_dir = os.path.join(DEMO_DIR, "shards")
            if not os.path.isdir(shard_dir):
                samples.make_sample_shards(shard_dir, shards=2, images_per_shard=6)
            config.input.shards = [shard_dir]
            config.output.path = args.output or os.path.join(DEMO_DIR, "out")
        stages = [job_config.build_stage(stage) for stage in config.stages]
        pipeline.connect_ray(config)
        summary = pipeline.run(config, stages)
    except (job_config.ConfigError, output.IncompatibleOutput, FileNotFoundError, ValueError) as exc:
        print(f"sculpt: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(f"Rows: {summary['output']}/*.parquet (read with pyarrow.dataset or pandas); `sculpt status {summary['output']}` for totals.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
