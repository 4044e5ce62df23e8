"""Where the index's shard jobs run: in this process, or on a Dask cluster.

    with shard_map(workers=2) as run:                     # a LocalCluster of 2 processes
        index = build_index(model, train, root, shard_map=run)
    with shard_map(address="tcp://10.0.0.5:8786") as run: # an existing scheduler
        top = index.top(model, flagged, k=10, shard_map=run)

A `ShardMap` is `run(fn, items, **shared) -> [fn(item, **shared) for item in items]`, results in
the order of `items`. `shared` holds what every job needs (the model, the training data, the
preconditioned queries): on Dask it is sent to each worker once (`scatter(broadcast=True)`),
not with every job. Jobs are pure functions of their arguments that write content-addressed
files renamed into place (store.py), so Dask may run one twice: a job whose worker died is
rescheduled on another worker (Dask's own failure handling, up to
`distributed.scheduler.allowed-failures` times) and a job that raised is retried `retries` times,
without ever leaving a half-written shard that a reader would trust. When the cluster itself
fails (the scheduler is lost, or a job's workers keep dying) the map raises ClusterFailed, one
sentence; the shards finished so far stay and a later build reuses them.

Workers must see the index folder at the same path (one machine, or a shared filesystem) and
import this package. Dask is imported only when a cluster is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from audit.errors import ClusterFailed, InvalidInput


class ShardMap(Protocol):
    def __call__(self, fn: Callable[..., Any], items: Sequence[Any], **shared: Any) -> list[Any]: ...


def local_map(fn: Callable[..., Any], items: Sequence[Any], **shared: Any) -> list[Any]:
    """Every job in this process, in order."""
    return [fn(item, **shared) for item in items]


@contextlib.contextmanager
def shard_map(address: str | None = None, workers: int | None = None, retries: int = 2,
              connect_timeout: float = 20.0) -> Iterator[ShardMap]:
    """A ShardMap for the duration: `local_map` when neither `address` nor `workers` is given; the
    Dask scheduler at `address` (e.g. "tcp://127.0.0.1:8786", waited for `connect_timeout`
    seconds); or a LocalCluster of `workers` single-threaded processes on loopback, closed on
    exit. `retries`: re-runs of a job that raised."""
    if address is not None and workers is not None:
        raise InvalidInput("Give either a Dask scheduler address or a number of local workers, not both.")
    if address is None and workers is None:
        yield local_map
        return
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise InvalidInput(f"The number of Dask workers must be a positive integer; got {workers!r}.")
    from distributed import Client, LocalCluster
    with contextlib.ExitStack() as stack:
        if address is not None:
            try:
                client = stack.enter_context(Client(address, timeout=f"{connect_timeout}s"))
            except OSError as error:
                raise InvalidInput(f"No Dask scheduler answered at {address} ({error}).") from error
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        yield client_map(client, retries)


@dataclass(frozen=True)
class _Boxed:
    """A shared value sent as one plain pickle: Dask's own serializer for torch modules rebuilds
    them without the OrderedDicts that forward hooks need, and it would split a list or dict
    into one future per element."""

    value: Any


def _unboxed(item: Any, fn: Callable[..., Any], **boxed: _Boxed) -> Any:
    return fn(item, **{name: box.value for name, box in boxed.items()})


def client_map(client, retries: int = 2) -> ShardMap:
    """A ShardMap on the Dask cluster of `client` (a distributed.Client), which the caller owns."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    address = client.scheduler.address

    def run(fn: Callable[..., Any], items: Sequence[Any], **shared: Any) -> list[Any]:
        if not items:
            return []
        broadcast = {name: client.scatter(_Boxed(value), broadcast=True, hash=False) for name, value in shared.items()}
        futures = client.map(_unboxed, list(items), fn=fn, pure=False, retries=retries, **broadcast)
        try:
            return client.gather(futures)
        except (KilledWorker, OSError, CancelledError) as error:  # the cluster, not a job, failed
            why = f"{type(error).__name__}: {error}"
            raise ClusterFailed(f"The Dask cluster at {address} lost the index's jobs ({why}); what they finished "
                                "is kept and reused when the audit runs again.") from error

    return run
