"""Cluster submission: `ray job submit` of the smoke chain to a head this test starts on loopback."""
import os
import re
import socket
import subprocess
import sys

import pytest

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_smoke_chain_on_a_cluster(tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    # Ray 2.60 turns token authentication on by default: the client must send the token that
    # `ray start` wrote, which RAY_AUTH_MODE=token makes it do.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", "--num-cpus=2", "--num-gpus=0",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    storage = tmp_path / "shared-storage"
    try:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
             "--working-dir", REPO, "--", sys.executable, "tune/run_search.py", "--stage", "virface",
             "--budget", "smoke", "--storage", str(storage), "--quiet"],
            env=env, capture_output=True, text=True, timeout=600)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        job_id = re.search(r"raysubmit_\w+", output).group(0)
        status = subprocess.run([RAY, "job", "status", "--address", f"http://127.0.0.1:{dashboard_port}",
                                 job_id], env=env, capture_output=True, text=True, timeout=60)
        text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        # The CLI's wording of the SUCCEEDED status.
        assert f"Job '{job_id}' succeeded" in text, text
        for stage in ("pretrain", "generator", "virface"):
            manifest = read_manifest(storage / "default" / stage / "best.json")
            assert os.path.isfile(manifest.checkpoint)
    finally:
        # Stops the Ray processes of this machine: the head this test started.
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
