"""virface.storage: local paths and storage URIs through pyarrow, against moto's S3 server on
loopback (no Ray)."""
import json
import os
import subprocess
import sys

import pytest

from virface import storage
from virface.errors import ConfigError
from virface.search.lock import ExperimentLock, ExperimentLockedError, lock_holder
from virface.search.runner import SearchOptions, resolve_storage

from conftest import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def test_uris_are_told_from_paths_and_joined_before_their_query():
    assert storage.is_uri("s3://b/p") and storage.is_uri("gs://b") and not storage.is_uri("/tmp/x")
    assert not storage.is_uri("relative/s3:/x") and not storage.is_uri(None)
    assert storage.join("s3://b/pre?endpoint_override=h:1&scheme=http", "exp", "best.json") == \
        "s3://b/pre/exp/best.json?endpoint_override=h:1&scheme=http"
    assert storage.join("s3://b/pre/", "/x/") == "s3://b/pre/x"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    # Ray's paths on the file system (bucket/key) become URIs like the storage's, query included.
    assert storage.uri_for("s3://b/pre?scheme=http", "b/pre/search/ckpt") == "s3://b/pre/search/ckpt?scheme=http"
    assert storage.uri_for("/tmp/a", "/tmp/a/x") == "/tmp/a/x"
    assert storage.without_credentials("s3://KEY:SECRET@b/p?x=1") == "s3://b/p?x=1"
    assert storage.basename("s3://b/p/best.pt?scheme=http") == "best.pt"


def test_a_search_storage_uri_is_kept_and_its_records_go_to_a_local_copy(tmp_path):
    assert resolve_storage("s3://bucket/experiments/") == "s3://bucket/experiments"
    with pytest.raises(ConfigError, match="SCHEME://BUCKET/PREFIX"):
        resolve_storage("s3:///experiments")
    options = SearchOptions(storage="s3://bucket/exp?endpoint_override=h:1&scheme=http", name="n")
    assert options.storage_uri == "s3://bucket/exp?endpoint_override=h:1&scheme=http"
    assert options.storage == storage.mirror_dir(options.storage_uri) and os.path.isabs(options.storage)
    assert options.experiment_location == "s3://bucket/exp/n?endpoint_override=h:1&scheme=http"
    # A local path is what it always was.
    local = SearchOptions(storage=str(tmp_path / "exp"))
    assert local.storage == str(tmp_path / "exp") and local.storage_uri is None
    assert local.experiment_location == str(tmp_path / "exp" / "default")


def test_local_paths_read_and_write_as_plain_files(tmp_path):
    path = str(tmp_path / "a" / "f.bin")
    storage.write_bytes(path, b"one")
    assert open(path, "rb").read() == b"one" and storage.read_bytes(path) == b"one"
    assert storage.exists(path) and storage.is_file(path) and storage.local_file(path) == path
    assert [n for n in os.listdir(tmp_path / "a")] == ["f.bin"]      # no temporary left behind
    storage.delete(path)
    storage.delete(path)                                                # gone: nothing to do
    assert not storage.exists(path)


def test_an_object_round_trips_and_a_download_is_refetched_when_the_object_changes(s3, tmp_path):
    uri = s3.uri("unit/round/f.bin")
    storage.write_bytes(uri, b"x" * 1000)
    assert s3.read("unit/round/f.bin") == b"x" * 1000
    assert storage.exists(uri) and storage.is_file(uri) and not storage.is_file(s3.uri("unit/round"))
    first = storage.local_file(uri)
    assert open(first, "rb").read() == b"x" * 1000 and first.startswith(storage.cache_root())
    storage.write_bytes(uri, b"y" * 10)
    assert open(storage.local_file(uri), "rb").read() == b"y" * 10
    local = tmp_path / "up.txt"
    local.write_text("hello")
    storage.upload_file(str(local), s3.uri("unit/round/up.txt"))
    storage.download_file(s3.uri("unit/round/up.txt"), str(tmp_path / "down.txt"))
    assert (tmp_path / "down.txt").read_text() == "hello"
    assert storage.list_files(s3.uri("unit/round")) .keys() == {"f.bin", "up.txt"}
    assert storage.list_folders(s3.uri("unit")) == ["round"]
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


WRITE_THEN_DIE = """
import os, signal, sys
import pyarrow.fs
from virface import storage
fs, path = storage.resolve(sys.argv[1])
stream = fs.open_output_stream(path)
stream.write(b"half of it")
os.kill(os.getpid(), signal.SIGKILL)      # before the stream is closed
"""


def test_a_writer_killed_mid_object_leaves_no_object_and_a_finished_one_is_whole(s3, tmp_path):
    uri = s3.uri("unit/atomic/f.bin")
    storage.write_bytes(uri, b"old content")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")])}
    died = subprocess.run([sys.executable, "-c", WRITE_THEN_DIE, uri], env=env, timeout=60)
    assert died.returncode == -9
    assert storage.read_bytes(uri) == b"old content"
    fresh = s3.uri("unit/atomic/new.bin")
    subprocess.run([sys.executable, "-c", WRITE_THEN_DIE, fresh], env=env, timeout=60)
    assert not storage.exists(fresh)


def test_the_mirror_pulls_the_remote_records_and_sends_only_what_changed(s3, tmp_path):
    remote = s3.uri("unit/mirror/exp")
    storage.write_bytes(storage.join(remote, "pretrain", "best.json"), b"{}")
    storage.write_bytes(storage.join(remote, "search_pretrain", "experiment_state-1.json"), b"{}")
    storage.write_bytes(storage.join(remote, "pretrain", "tb", "run", "events"), b"e")
    local = tmp_path / "exp"
    (local / "pretrain").mkdir(parents=True)
    (local / "pretrain" / "optuna.journal").write_text("stale")      # not remote: removed
    mirror = storage.ExperimentMirror(str(local), remote)
    mirror.pull()
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    # Tune's folder stays remote; TensorBoard runs are sent, never fetched.
    assert files == ["pretrain/best.json"]
    (local / "pretrain" / "trials.json").write_text("[]")
    (local / "resume_command.txt").write_text("x")
    assert mirror.sync(skip=["resume_command.txt"]) == ["pretrain/trials.json"]
    assert mirror.sync() == ["resume_command.txt"]
    assert mirror.sync() == []
    assert s3.read("unit/mirror/exp/pretrain/trials.json") == b"[]"


def test_bad_storage_is_an_error_naming_the_uri(s3):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/x.*bucket no-such-bucket does not exist"):
        storage.check_reachable(f"s3://no-such-bucket/x?endpoint_override={s3.endpoint}&scheme=http")
    with pytest.raises(storage.StorageError, match=r"s3://b/x\?endpoint_override=127.0.0.1:1.*cannot be reached"):
        storage.check_reachable("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http")
    with pytest.raises(storage.StorageError, match="not a URI pyarrow can open"):
        storage.exists("s3://b/x?no_such_option=1")
    storage.check_reachable(s3.uri("fine"))


def test_the_remote_lock_names_its_holder_and_a_dead_holder_is_taken_over(s3):
    folder = s3.uri("unit/lock/exp")
    with ExperimentLock(folder):
        holder, alive = lock_holder(folder)
        assert alive and holder["pid"] == os.getpid()
        assert json.loads(s3.read("unit/lock/exp/driver.lock"))["pid"] == os.getpid()
    assert lock_holder(folder) == (None, False)                       # released: the object is gone
    # A live driver elsewhere on this machine holds it: refused, naming it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from virface.search.lock import _process_start
        import socket
        storage.write_bytes(storage.join(folder, "driver.lock"), json.dumps(
            {"host": socket.gethostname(), "pid": other.pid, "process_start": _process_start(other.pid),
             "since": "then"}).encode())
        with pytest.raises(ExperimentLockedError, match=f"pid {other.pid} on this machine"):
            ExperimentLock(folder).acquire()
    finally:
        other.kill()
        other.wait()
    with ExperimentLock(folder) as lock:                                # its holder died: taken over
        assert lock.held and lock_holder(folder)[0]["pid"] == os.getpid()
