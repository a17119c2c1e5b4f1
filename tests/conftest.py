import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import pytest
import torch

from virface.data.loading import StageData
from virface.data.sources import ArraySource
from virface.evaluation.pairs import PairSet


def random_stage_data(seed: int = 0, size: int = 16, n_ids: int = 6, per_id: int = 4,
                      n_unlabeled: int = 12, n_pairs: int = 20) -> StageData:
    """Random images: enough to exercise every code path of a stage in a second."""
    rng = np.random.default_rng(seed)
    labeled = ArraySource(rng.integers(0, 256, (n_ids * per_id, size, size, 3), dtype=np.uint8),
                          np.repeat(np.arange(100, 100 + n_ids), per_id), "tiny:labeled")
    unlabeled = ArraySource(rng.integers(0, 256, (n_unlabeled, size, size, 3), dtype=np.uint8),
                            np.arange(n_unlabeled), "tiny:unlabeled")
    pairs = PairSet("tiny_pairs", torch.from_numpy(rng.integers(0, 256, (2 * n_pairs, 3, size, size),
                                                                 dtype=np.uint8)),
                    np.tile([True, False], n_pairs // 2))
    return StageData(labeled, unlabeled, {"tiny_pairs": pairs}, size)


@pytest.fixture
def tiny_data() -> StageData:
    return random_stage_data()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Synthetic data caches go to a per-session folder, never the user's home; under xdist, one
    # folder for all the workers of the run (a cache file is written whole and renamed into place).
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    monkeypatch.setenv("VIRFACE_CACHE_DIR", str(base / "virface-cache"))


# --- Ray beside other Rays on one host ------------------------------------------------------------
# A shared host may run other Rays on Ray's default ports (GCS 6379, dashboard 8265, its agent
# 52365, client server 10001, workers 10002-19999, metrics 44217 and 44227) and under the default
# /tmp/ray. Every Ray this suite starts gets free ports and a temp root of its own, and is stopped
# by its own process id: never `ray stop`, which stops every Ray of the machine.

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ports Ray's own processes take from the environment; 0: the OS picks a free one.
RAY_PORT_ENVIRONMENT = {"DASHBOARD_METRIC_PORT": "0", "AUTOSCALER_METRIC_PORT": "0"}


def free_port() -> int:
    """A TCP port no process listens on now (for a Ray option that will not take 0)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_port_options(dashboard_port: int) -> list[str]:
    """`ray start` options that put every port of the node on a free one (0: Ray or the OS picks)."""
    return ["--port=0", f"--dashboard-port={dashboard_port}", "--dashboard-agent-listen-port=0",
            "--dashboard-agent-grpc-port=0", "--runtime-env-agent-port=0", "--metrics-export-port=0",
            f"--ray-client-server-port={free_port()}", "--node-manager-port=0",
            "--object-manager-port=0", "--min-worker-port=0", "--max-worker-port=0"]


@dataclasses.dataclass(frozen=True)
class RayHead:
    """A Ray head node this test started: its GCS address, its dashboard (jobs are submitted
    there), its temp root and the process id that stops it."""
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    pid: int


@contextlib.contextmanager
def ray_head(options: list[str], env: dict[str, str], startup_s: float = 300) -> Iterator[RayHead]:
    """`ray start --head --block OPTIONS` with a temp root of its own; SIGTERM to its pid stops it
    and every process it started. ``options`` must include the dashboard's port."""
    temp_dir = tempfile.mkdtemp(prefix="vf-ray-")        # short: Ray's socket paths fit 107 bytes
    # Stopping drains the node for 30 s first (for Serve), which nothing here needs.
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    process = subprocess.Popen([RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}",
                                "--disable-usage-stats", *options],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address_file = os.path.join(temp_dir, "ray_current_cluster")   # written once it is up
        deadline = time.monotonic() + startup_s
        while not os.path.exists(address_file):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log.name) as f:
                    raise RuntimeError(f"ray start did not come up (exit {process.poll()}):\n"
                                       + f.read()[-3000:])
            time.sleep(0.2)
        with open(address_file) as f:
            gcs_address = f.read().strip()
        port = next(o.split("=", 1)[1] for o in options if o.startswith("--dashboard-port="))
        yield RayHead(gcs_address, f"http://127.0.0.1:{port}", temp_dir, process.pid)
    finally:
        stop_ray_head(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_ray_head(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a `ray start --block` (started in a process group of its own) and every process it
    started: SIGTERM to it, which stops its node; then SIGKILL to whatever is left of its group."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# `ray start` turns Ray's token authentication on (2.60); a client joins with the token that it
# wrote (~/.ray/auth_token) only when RAY_AUTH_MODE=token. A client whose mode differs from the
# cluster's connects, but the actors of its job never start ("cancelled before it started
# running"): every process that joins the shared head says token.
JOIN_WITH_TOKEN = "token"


@pytest.fixture(scope="session")
def _shared_ray_head(_ray_temp_root_and_metrics_ports_of_its_own) -> Iterator[RayHead]:
    # Started by the first test that asks for it, stopped at the end of the session: one per
    # test process (pytest-xdist worker). Ray's processes inherit the environment they start
    # with: the S3 test credentials (moto's, harmless elsewhere) and where the state API finds
    # this head's dashboard (Ray Train's placement-group clean-up asks it).
    dashboard_port = free_port()
    env = {**os.environ, **RAY_PORT_ENVIRONMENT, **S3_ENVIRONMENT,
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    with ray_head(["--node-ip-address=127.0.0.1", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                   *free_port_options(dashboard_port)], env) as head:
        yield head


def loopback_gcs_address(head: RayHead) -> str:
    """The head's GCS on 127.0.0.1 (it listens on every address; its address file names the
    machine's network address): the tests talk to loopback only."""
    return "127.0.0.1:" + head.gcs_address.rsplit(":", 1)[1]


@pytest.fixture
def shared_ray_head(_shared_ray_head) -> RayHead:
    """This test process's shared Ray head itself (its dashboard: where a test submits a job)."""
    return _shared_ray_head


@pytest.fixture
def shared_ray(_shared_ray_head, monkeypatch) -> str:
    """The address of this test process's shared 2-CPU Ray head on loopback, also set as
    RAY_ADDRESS for the test: a search driver or ``virface-train --workers`` it runs (in this
    process or a child) joins that Ray instead of starting one of its own, which saves each
    driver Ray's start-up and shutdown (several seconds of two busy cores). A test that is about
    starting Ray, or that needs a Ray with its own environment, does not use it."""
    address = loopback_gcs_address(_shared_ray_head)
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("RAY_AUTH_MODE", JOIN_WITH_TOKEN)
    return address


@pytest.fixture(scope="module")
def connected_ray(_shared_ray_head) -> Iterator[str]:
    """This test process connected to the shared Ray head for a module's in-process searches
    (``run_search`` then uses that Ray); disconnected at the module's end. Its address."""
    import logging

    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state

    address = loopback_gcs_address(_shared_ray_head)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", JOIN_WITH_TOKEN)
        # Ray reads the mode once per process, whatever the environment says later: this test
        # process may have used Ray before (an in-process local Ray, another mode). Ray's own
        # tests reset it so.
        reset_auth_token_state()
        ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level=logging.WARNING)
        yield address
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _ray_temp_root_and_metrics_ports_of_its_own() -> Iterator[None]:
    # Every Ray the suite starts (ray.init, drivers, clusters) keeps its sessions, sockets and
    # address file here, not in the host's /tmp/ray, and takes free metrics ports.
    root = tempfile.mkdtemp(prefix="vf-rt-")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", root)
        for key, value in RAY_PORT_ENVIRONMENT.items():
            patch.setenv(key, value)
        yield
    shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist with --dist load --maxschedchunk 1 (`make test`), the tests go out one
    # by one in the order collected to whichever worker is free: the end-to-end runs (marked
    # slow, 20-200 s each) go first, so that they are shared out evenly and no long one starts
    # last while the other worker sits idle.
    if not hasattr(config, "workerinput"):           # xdist's workers collect; this is not one
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)   # stable: else collection order


# --- An S3-compatible server on loopback (moto's server mode) -----------------------------------

S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint: str          # host:port
    bucket: str

    def uri(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>`` with the endpoint in pyarrow's query parameters."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}")
        return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def s3_server(bucket: str = "vf-bucket") -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with ``bucket`` created and the AWS test
    credentials in the environment (set before any Ray starts: Ray's workers inherit them);
    stopped, and the environment put back, at the end."""
    import urllib.request

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start (exit {process.poll()})")
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in S3_ENVIRONMENT.items():
                patch.setenv(key, value)
            patch.delenv("AWS_ENDPOINT_URL", raising=False)
            import boto3

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=bucket)
            yield S3Server(f"127.0.0.1:{port}", bucket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_space(tmp_path, stage, **changes):
    """The shipped search space of ``stage`` with some sections replaced, written under tmp_path."""
    import yaml

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces", f"{stage}.yaml")) as f:
        space = yaml.safe_load(f)
    space.update(changes)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def start_search_until_a_trial_reports_epoch_2(cmd: list[str]):
    """Start a search driver (its own session, so it can be killed with its group) and read its
    output until a pretrain trial reports epoch 2; returns (the running driver, that trial's id)."""
    import re
    import time

    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.time() + 300
    for line in driver.stdout:
        match = re.match(r"\[pretrain\] trial \d+/\d+ (\w+) \| epoch 2/\d+:", line)
        if match:
            return driver, match.group(1)
        assert time.time() < deadline, "no trial reached epoch 2 in time"
    raise AssertionError("the driver ended before any trial reached epoch 2")
