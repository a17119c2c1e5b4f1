"""Cluster submission: `ray job submit` of the smoke chain to the test process's Ray head on
loopback (every port free), beside another Ray on the default ports (a shared host), which it
leaves running."""
import os
import re
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest
from conftest import RAY, RAY_PORT_ENVIRONMENT, RayHead, free_port, ray_head

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture
def another_ray_on_the_default_ports() -> Iterator[RayHead]:
    """Someone else's Ray, started as the docs say (`ray start --head`: dashboard agent 52365,
    workers 10002-19999, metrics 44217 and 44227; GCS 6379, dashboard 8265 and client server 10001
    unless another Ray of the host holds them), with 1 CPU."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_PORT_ENVIRONMENT}
    with ray_head([f"--port={default_or_free(6379)}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={default_or_free(8265)}",
                   f"--ray-client-server-port={default_or_free(10001)}", "--num-cpus=1",
                   "--num-gpus=0"], env) as head:
        # Its agent's HTTP server binds 52365 after the node is up; the test needs it held.
        deadline = time.monotonic() + 120
        while default_or_free(52365) == 52365:
            assert time.monotonic() < deadline, "the other Ray's dashboard agent never took port 52365"
            time.sleep(0.5)
        yield head


def default_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return free_port()
    return port


def test_ray_job_submit_runs_the_smoke_chain_on_a_cluster(another_ray_on_the_default_ports,
                                                          shared_ray_head: RayHead, tmp_path):
    # Ray 2.60 turns token authentication on by default: the client must send the token that
    # `ray start` wrote, which RAY_AUTH_MODE=token makes it do.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # The other Ray holds the dashboard agent's default port: ours must not need it.
    address = shared_ray_head.dashboard_url
    storage = tmp_path / "shared-storage"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address,
         "--working-dir", REPO, "--", sys.executable, "tune/run_search.py", "--stage", "virface",
         "--budget", "smoke", "--storage", str(storage), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600)
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-4000:]
    job_id = re.search(r"raysubmit_\w+", output).group(0)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    # The CLI's wording of the SUCCEEDED status.
    assert f"Job '{job_id}' succeeded" in text, text
    for stage in ("pretrain", "generator", "virface"):
        manifest = read_manifest(storage / "default" / stage / "best.json")
        assert os.path.isfile(manifest.checkpoint)
    # The other Ray is still up: nothing here stopped it.
    other = another_ray_on_the_default_ports
    assert subprocess.run([RAY, "status", f"--address={other.gcs_address}"], env=env,
                          capture_output=True, timeout=120).returncode == 0
