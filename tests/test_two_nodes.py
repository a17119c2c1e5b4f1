"""A search on a two-node Ray cluster (both nodes on loopback): trials land on both nodes; a node
removed while its trial runs sends that trial back to its last checkpoint on the other node; the
search completes and nothing is lost."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Runs in its own process: the cluster, the driver (a subprocess of it) and the removal.
SCRIPT = textwrap.dedent("""
    import json, os, re, subprocess, sys, threading, time
    os.environ["RAY_AUTH_MODE"] = "disabled"          # a loopback-only test cluster
    from ray.cluster_utils import Cluster

    storage, space, repo = sys.argv[1:4]
    loopback = dict(node_ip_address="127.0.0.1", num_cpus=1)
    # Every port free (0: Ray or the OS picks), beside any other Ray of the host.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        loopback, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
        dashboard_agent_listen_port=0))
    worker = cluster.add_node(**loopback)
    try:
        # Ray rewrites a 127.0.0.1 address to the machine's network address, where this
        # loopback-only cluster does not listen; this (Ray's own) switch keeps it on loopback.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        driver = subprocess.Popen(
            [sys.executable, os.path.join(repo, "tune", "run_search.py"), "--stage", "pretrain",
             "--space", space, "--storage", storage, "--address", cluster.address,
             "--synthetic", "n_labeled_ids=16", "--synthetic", "images_per_labeled_id=20",
             "--synthetic", "n_unlabeled_ids=40", "--synthetic", "n_val_ids=16",
             "--synthetic", "val_pairs=100"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
        reader.start()
        # Both trials running (one per node), each past its first epoch: then remove a node.
        deadline = time.time() + 300
        while len({m.group(1) for m in (re.search(r"trial \\d/2 (\\w+) \\| epoch 1/4:", x) for x in list(lines)) if m}) < 2:
            assert driver.poll() is None and time.time() < deadline, "".join(lines[-30:])
            time.sleep(0.2)
        cluster.remove_node(worker)
        driver.wait(timeout=600)
        reader.join(timeout=10)
        print(json.dumps({"returncode": driver.returncode, "output": "".join(lines)}))
    finally:
        cluster.shutdown()
""")

SPACE = """\
scheduler: {type: none}
budget: {num_samples: 2, max_concurrent_trials: 2}
fixed: {arch: mobilefacenet_s, max_epoch: 4, label_batch_size: 8}
parameters:
  lr: {type: float, low: 0.01, high: 0.1, log: true, default: 0.05}
"""


def test_a_node_removed_mid_trial_sends_the_trial_to_the_other_node_from_its_checkpoint(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "cluster.py").write_text(SCRIPT)
    storage = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run([sys.executable, str(tmp_path / "cluster.py"), str(storage),
                          str(tmp_path / "space.yaml"), REPO], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    output = report["output"]
    assert report["returncode"] == 0, output[-4000:]
    assert "retrying from its last checkpoint" in output, output[-4000:]
    manifest = read_manifest(storage / "default" / "pretrain" / "best.json")
    trials = json.loads((storage / "default" / "pretrain" / "trials.json").read_text())["trials"]
    assert [t["outcome"] for t in trials] == ["completed", "completed"]
    assert manifest.metric_value == max(t["metric"] for t in trials)
    # Each trial trained epochs 1..4 once: the retried one went on from its checkpoint.
    for path in (storage / "default" / "search_pretrain").glob("*/result.json"):
        epochs = [json.loads(x)["epoch"] for x in path.read_text().splitlines() if x.strip()]
        assert sorted(set(epochs)) == [1, 2, 3, 4] and epochs.count(1) == 1, (path, epochs)
