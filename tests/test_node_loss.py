"""A worker node lost mid-run (a spot GPU node taken back) costs the work that was on it, never the run: the job
finishes in the same run with every image exactly once. On a ``ray.cluster_utils.Cluster`` of a head node (the
driver's) and two worker nodes with logical GPUs, in a process of its own (a Cluster cannot join the session's
local Ray)."""

import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_worker_node_lost_mid_run_costs_its_work_not_the_run(tmp_path):
    """The first worker node; `python -m tests.test_node_loss DIR 1` loses the other (docs/BENCHMARKS.md: 5 of 5
    runs each)."""
    done = subprocess.run([sys.executable, "-m", "tests.test_node_loss", str(tmp_path), "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lost_mid_run"], result  # the node went while units were still to commit
    assert result["control_nodes"] == [result["head"]] * 2  # the gate and the device-fault counts: the driver's node
    summary = result["summary"]
    assert summary["pending"] == {} and summary["committed_now"] == 8
    rows = [tuple(row) for row in result["rows"]]
    assert len(rows) == len(set(rows)) == 16  # every image of the 4 shards, once


def lose_a_node_mid_run(cluster, node, out, result):
    """Once the first unit is committed, remove the node as a kill does (its processes end at once)."""
    from sculpt.outputs.store import OutputStore

    store, deadline = OutputStore(out), time.monotonic() + 600
    while not store.committed() and time.monotonic() < deadline:
        time.sleep(0.1)
    result["lost_mid_run"] = len(store.committed()) < 8
    cluster.remove_node(node, allow_graceful=False)


def main(tmp: str, lost: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from sculpt import config
    from sculpt.engine.job import annotate
    from sculpt.testing.samples import make_sample_shards

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    shards = make_sample_shards(os.path.join(tmp, "in"), shards=4, images_per_shard=4)
    out = os.path.join(tmp, "out")
    # both actors fit on one worker, so that either node can go and the run still has room
    stage = {"name": "hold", "class": "tests.doubles:HoldGpu", "gpus": 0.5, "cpus": 0.5, "actors": 2, "batch_size": 1,
             "params": {"seconds_per_image": 1.0}}
    cfg = config.load(None, [f"input.shards={json.dumps(shards)}", f"output.path={out}", f"stages={json.dumps([stage])}",
                             "input.chunk_images=2", "input.batch_images=1", "progress_seconds=5"])
    result = {"head": ray.get_runtime_context().get_node_id()}
    loser = threading.Thread(target=lose_a_node_mid_run, args=(cluster, workers[int(lost)], out, result), daemon=True)
    loser.start()
    stages = [config.build_stage(entry) for entry in cfg.stages]
    gate_nodes = []

    def watch_control_actors():
        while not gate_nodes:
            found = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            gate_nodes.extend(sorted(a.node_id for a in found if a.class_name in ("ChunkGate", "DeviceFaults")))
            if len(gate_nodes) < 2:
                gate_nodes.clear()
                time.sleep(0.2)

    watcher = threading.Thread(target=watch_control_actors, daemon=True)
    watcher.start()
    result["summary"] = annotate(cfg, stages)
    watcher.join(timeout=5)
    loser.join(timeout=5)
    import pyarrow.dataset as pads

    rows = pads.dataset(out, format="parquet").to_table(columns=["shard", "index"]).to_pydict()
    result.update(control_nodes=gate_nodes, rows=list(zip(rows["shard"], rows["index"])))
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
