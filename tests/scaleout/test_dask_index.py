"""The gradient index built and queried on a real Dask cluster: a `dask scheduler` and two
`dask worker` processes on loopback. Sharded results equal the single-process ones, and a worker
killed mid-build costs a retry, never a corrupt index."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from audit.demo.digits import load_digits_splits
from audit.demo.models import SmallResNet
from audit.errors import ClusterFailed, InvalidInput
from audit.influence.index import IndexConfig, build_index
from audit.influence.index.cluster import shard_map

pytestmark = pytest.mark.slow

DASK = str(Path(sys.executable).parent / "dask")
# 9 shards of 128 digits: enough jobs that both workers are busy when one is killed
CONFIG = IndexConfig(rank_in=8, rank_out=8, shard_rows=128, batch_size=32)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.05)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


class Cluster:
    """A scheduler and workers started as separate process groups, stopped on close."""

    def __init__(self, tmp: Path, workers: int):
        tmp.mkdir(parents=True, exist_ok=True)
        self.file = tmp / "scheduler.json"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
        self.scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                           "--no-dashboard", "--scheduler-file", str(self.file)], **quiet)
        _wait_for(self.file.exists, 60, "the Dask scheduler")
        self.workers = [subprocess.Popen([DASK, "worker", "--scheduler-file", str(self.file), "--host", "127.0.0.1",
                                          "--nthreads", "1", "--no-dashboard", "--death-timeout", "60"], **quiet)
                        for _ in range(workers)]
        from distributed import Client

        with Client(scheduler_file=str(self.file), timeout="30s") as client:
            self.address = client.scheduler.address
            client.wait_for_workers(workers, timeout=120)

    def kill_worker(self, i: int) -> None:
        os.killpg(self.workers[i].pid, signal.SIGKILL)  # the worker and its nanny, no goodbye

    def kill_scheduler(self) -> None:
        os.killpg(self.scheduler.pid, signal.SIGKILL)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers, self.scheduler]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as on each Dask worker (its nanny sets OMP_NUM_THREADS=1): the same
    float sums in the same order, so local and sharded numbers are bit for bit the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = Cluster(tmp_path_factory.mktemp("dask"), workers=2)
    yield started
    started.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init CNN (the index's cost and correctness do not depend on training) on the digits,
    and its index built in this process."""
    splits = load_digits_splits(0.1, seed=0)
    torch.manual_seed(0)
    model = SmallResNet(num_classes=10, channels=8)
    with one_thread():
        local = build_index(model, splits.train.dataset(), tmp_path_factory.mktemp("local"), CONFIG, progress=False)
    return model, splits, local


def test_the_index_built_on_two_dask_workers_is_the_single_process_index(cluster, setup, tmp_path):
    model, splits, local = setup
    with shard_map(address=cluster.address) as run:
        sharded = build_index(model, splits.train.dataset(), tmp_path, CONFIG, progress=False, shard_map=run)
        assert sharded.stats.computed == len(local.shards) == 9 and sharded.stats.reused == 0
        # same content-addressed shards, same bytes (their SHA-256), same training-set digest
        assert sharded.shards == local.shards and sharded.data_digest == local.data_digest
        assert all(torch.equal(a, b) for a, b in zip(sharded.rows(verify=True), local.rows(), strict=True))
        flagged = splits.validation.subset(range(20)).dataset()
        with one_thread():
            left = local.preconditioned(local.query_gradients(model, flagged))
            scores, self_scores = local.scores_of(left), local.self_influence()
            expected = local.top(model, flagged, k=10)
            top = sharded.top(model, flagged, k=10, shard_map=run)
        assert torch.equal(sharded.scores_of(left, shard_map=run), scores)
        assert torch.equal(sharded.self_influence(shard_map=run), self_scores)
        for field in ("proponents", "proponent_scores", "opponents", "opponent_scores", "ranks"):
            assert torch.equal(getattr(top, field), getattr(expected, field)), field
        again = build_index(model, splits.train.dataset(), tmp_path, CONFIG, progress=False, shard_map=run)
        assert again.stats.computed == 0 and again.stats.reused == 9


def test_a_worker_killed_mid_build_is_retried_by_dask_and_the_index_is_whole(setup, tmp_path):
    model, splits, local = setup
    own = Cluster(tmp_path / "dask", workers=2)  # its own cluster: this test kills one of its workers
    root = tmp_path / "index"
    result, failure = {}, {}

    def build():
        try:
            with shard_map(address=own.address) as run:
                result["index"] = build_index(model, splits.train.dataset(), root, CONFIG, progress=False,
                                              shard_map=run)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failure["error"] = error

    try:
        thread = threading.Thread(target=build)
        thread.start()
        _wait_for(lambda: list(root.glob("*/shards/*.safetensors")), 120, "the first stored shard")
        assert not list(root.glob("*/data-*.json")), "the build finished before a worker could be killed"
        own.kill_worker(0)
        thread.join(timeout=300)
        assert not thread.is_alive() and not failure, failure
    finally:
        own.close()
    index = result["index"]
    assert index.stats.computed == 9 and index.shards == local.shards
    assert all(torch.equal(a, b) for a, b in zip(index.rows(verify=True), local.rows(), strict=True))
    # what the killed worker was writing is left under a temporary name that no reader opens
    assert {p.name for p in (root / index.folder.folder.name / "shards").glob("*.npy")} == {
        f"{s.digest}.npy" for s in local.shards}


def test_a_scheduler_lost_mid_build_fails_in_one_sentence_and_the_next_build_reuses_the_finished_shards(
        setup, tmp_path):
    model, splits, local = setup
    own = Cluster(tmp_path / "dask", workers=2)
    root = tmp_path / "index"
    failure = {}

    def build():
        try:
            with shard_map(address=own.address) as run:
                build_index(model, splits.train.dataset(), root, CONFIG, progress=False, shard_map=run)
        except Exception as error:  # noqa: BLE001 - checked below
            failure["error"] = error

    try:
        thread = threading.Thread(target=build)
        thread.start()
        _wait_for(lambda: list(root.glob("*/shards/*.safetensors")), 120, "the first stored shard")
        own.kill_scheduler()
        thread.join(timeout=300)
        assert not thread.is_alive()
    finally:
        own.close()
    error = failure.get("error")
    assert isinstance(error, ClusterFailed), repr(error)
    assert str(error).startswith(f"The Dask cluster at {own.address} lost the index's jobs")
    assert not list(root.glob("*/data-*.json"))  # no training set was recorded as indexed
    with one_thread():
        again = build_index(model, splits.train.dataset(), root, CONFIG, progress=False)
    assert again.stats.reused >= 1 and again.stats.computed + again.stats.reused == 9
    assert again.shards == local.shards
    assert all(torch.equal(a, b) for a, b in zip(again.rows(verify=True), local.rows(), strict=True))


def test_a_local_cluster_of_workers_gives_the_same_index(setup, tmp_path):
    model, splits, local = setup
    with shard_map(workers=2) as run:
        sharded = build_index(model, splits.train.dataset(), tmp_path, CONFIG, progress=False, shard_map=run)
    assert sharded.shards == local.shards


def test_a_cluster_is_asked_for_one_way_and_a_missing_scheduler_is_one_sentence():
    with pytest.raises(InvalidInput, match="not both"), shard_map(address="tcp://127.0.0.1:1", workers=2):
        pass
    with pytest.raises(InvalidInput, match="positive integer"), shard_map(workers=0):
        pass
    with pytest.raises(InvalidInput, match="No Dask scheduler answered at tcp://127.0.0.1:9"), \
            shard_map(address="tcp://127.0.0.1:9", connect_timeout=2):
        pass
