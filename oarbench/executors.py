"""Where per-case work runs: one seam, two engines.

``evaluate``, ``robustness`` and ``absent`` cut their work into small tasks
(one case, or one case x condition) and hand them to an :class:`Executor`::

    results = executor.map(fn, tasks, on_result=store)

``fn`` is a picklable top-level function and every task a small tuple of paths
and options: workers read the images they need themselves, so nothing large
passes through a scheduler. Results come back in task order; ``on_result(i,
result)`` is called in this process as each task finishes (to cache it and move
the progress bar), in whatever order they finish.

* :class:`LocalExecutor` (the default): this process (``workers=1``) or a
  process pool on this machine; needs nothing beyond the core install.
* :class:`DaskExecutor`: a Dask ``distributed`` cluster, either an existing
  scheduler (``address='tls://host:8786'``) or a ``LocalCluster`` of
  ``workers`` processes started here. Tasks can ask for worker resources
  (``{"GPU": 1}``). A worker that dies loses only the task it was running:
  Dask runs that task again on another worker.

A Dask scheduler runs whatever its clients send, and a plain ``tcp://`` one
asks no client who it is and sends everything in clear text. So a
``tls://`` scheduler is reached with certificates (mutual TLS,
``distributed.security.Security`` with ``require_encryption``), and a plain
``tcp://`` scheduler that is not on this machine's loopback is refused unless
the caller says ``insecure=True`` (:func:`dask_security`, docs/scale.md).

The numbers cannot depend on the engine: both call the same ``fn`` on the same
tasks, and the caller assembles the results in task order.
"""

from __future__ import annotations

import collections
import functools
import statistics
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from oarbench._net import is_loopback

__all__ = [
    "Executor",
    "LocalExecutor",
    "DaskExecutor",
    "dask_security",
    "make_executor",
    "parse_resources",
    "BatchSizer",
    "DASK_INSTALL_HINT",
]

DASK_INSTALL_HINT = "the dask executor needs dask and distributed: pip install 'oarbench[dask]'"

OnResult = Callable[[int, Any], None]

#: Address schemes whose traffic Dask encrypts; ``inproc`` never leaves the process.
_ENCRYPTED_SCHEMES = ("tls", "wss")
_TLS_OPTIONS = "--tls-ca-file, --tls-cert and --tls-key"


class Executor(Protocol):
    """Run ``fn(task)`` for every task; results in task order."""

    #: How many tasks run at once (for sizing threads per task).
    workers: int

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, on_result: OnResult | None = None,
            name: str = "task") -> list[Any]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """This process (``workers=1``) or a pool of ``workers`` processes on this machine.

    The first task that raises stops the run: the tasks not yet started are
    cancelled and the exception propagates (finished tasks have already been
    handed to ``on_result``).
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, on_result: OnResult | None = None,
            name: str = "task", while_running: Callable[[], Any] | None = None) -> list[Any]:
        """``while_running``: called once in this process when the pool's workers are started and
        every task is submitted (not called when the tasks run in this process), so this
        process can do its own work while it would otherwise only wait."""
        results: list[Any] = [None] * len(tasks)
        if self.workers == 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                if on_result is not None:
                    on_result(i, results[i])
            return results
        with ProcessPoolExecutor(max_workers=min(self.workers, len(tasks))) as pool:
            futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
            pending = set(futures)
            try:
                if while_running is not None:
                    while_running()
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in sorted(finished, key=futures.__getitem__):
                        i = futures[fut]
                        results[i] = fut.result()
                        if on_result is not None:
                            on_result(i, results[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ValueError(DASK_INSTALL_HINT) from None
    return distributed


def parse_resources(items: Sequence[str] | str | None) -> dict[str, float]:
    """``["GPU=1", "MEM=4e9"]`` or ``"GPU=1,MEM=4e9"`` -> ``{"GPU": 1.0, "MEM": 4e9}``."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, float] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            try:
                amount = float(value) if sep else 0.0
            except ValueError:
                amount = 0.0
            if not name or not (amount > 0 and amount != float("inf")):
                raise ValueError(f"resource {part!r}: expected NAME=AMOUNT with a positive amount, e.g. GPU=1")
            out[name] = amount
    return out


class DaskExecutor:
    """Tasks on a Dask ``distributed`` cluster.

    Parameters
    ----------
    address:
        Scheduler address of a running cluster (``tcp://host:8786``). ``None``
        starts a ``distributed.LocalCluster`` of ``workers`` processes (one
        thread each) on this machine, closed again by :meth:`close`.
    workers:
        Worker processes of the local cluster (ignored with ``address``).
    resources:
        Worker resources every task asks for, e.g. ``{"GPU": 1}``: on a cluster
        the tasks then run only on workers started with ``--resources GPU=1``;
        a local cluster gives each of its workers these resources.
    batch:
        Cases sent to a worker together as one Dask task. ``"auto"`` (the
        default) sizes them from the measured time per case
        (:class:`BatchSizer`): one case per Dask task when cases take longer
        than about 0.2 s, as CT-sized volumes and model inference do, and
        enough tiny cases per Dask task to keep the engine's own cost per task
        (a few milliseconds) small. An integer fixes the size. A lost worker
        loses the cases of its current Dask task, which run again elsewhere.
        Results, ``on_result`` and the order are per case either way.
    security:
        A ``distributed.security.Security`` for the scheduler at ``address``
        (:func:`dask_security` makes the one the address needs). None: what
        :func:`dask_security` says for ``address`` without certificate files
        (a plain address off loopback refused unless ``insecure``).
    insecure:
        Allow a plain ``tcp://`` address that is not on loopback.
    max_in_flight:
        At most this many Dask tasks are on the cluster at once; more are submitted
        as these finish, so that the scheduler's memory does not grow with the
        number of cases.
    echo:
        Where the cluster's address and dashboard link are printed (stderr by
        default; ``None`` prints nothing).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int = 1,
        resources: Mapping[str, float] | None = None,
        max_in_flight: int = 2000,
        batch: int | str = "auto",
        security: Any = None,
        insecure: bool = False,
        echo: Callable[[str], None] | None = lambda msg: print(msg, file=sys.stderr),
    ) -> None:
        distributed = _import_distributed()
        if address and security is None:
            security = dask_security(address, insecure=insecure)  # refuses a plain address off loopback
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        BatchSizer(batch, workers)  # checks the value
        self.batch = batch
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.resources = dict(resources or {})
        self.max_in_flight = max_in_flight
        self._cluster = None
        if address:
            try:
                self._client = distributed.Client(address, timeout="20s", security=security)
            except (OSError, TimeoutError) as exc:
                raise ValueError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        else:
            self._cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                resources=self.resources or None,
                silence_logs=40,  # logging.ERROR
            )
            self._client = distributed.Client(self._cluster)
        info = self._client.scheduler_info()
        threads = sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values())
        self.workers = max(1, threads or workers)
        self.address = str(self._client.scheduler.address)
        self.dashboard = self._client.dashboard_link if _has_dashboard() else None
        if echo is not None:
            kind = "Dask scheduler" if address else f"Dask LocalCluster ({workers} worker processes)"
            echo(f"{kind} at {self.address}; dashboard: {self.dashboard or 'not served (pip install bokeh)'}")

    def __repr__(self) -> str:
        return f"DaskExecutor(address={self.address!r}, workers={self.workers})"

    @property
    def client(self) -> Any:
        return self._client

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], *, on_result: OnResult | None = None,
            name: str = "task") -> list[Any]:
        distributed = _import_distributed()
        results: list[Any] = [None] * len(tasks)
        if not tasks:
            return results
        sizer = BatchSizer(self.batch, self.workers)
        # auto: a short window, so that batch sizes follow the measured task times;
        # a fixed size: up to max_in_flight Dask tasks, refilled when half have finished
        window = self.max_in_flight if sizer.fixed else min(self.max_in_flight, max(8, 4 * self.workers))
        refill_at = window // 2 if sizer.fixed else window - 1
        run = uuid.uuid4().hex[:8]
        groups: dict[str, range] = {}
        next_task = 0
        # Results are gathered in the background as Dask tasks finish.
        queue = distributed.as_completed(loop=self._client.loop, with_results=True)

        def submit(count: int) -> None:
            nonlocal next_task
            chosen: list[range] = []
            while len(chosen) < count and next_task < len(tasks):
                size = sizer.next_size(len(tasks) - next_task)
                chosen.append(range(next_task, next_task + size))
                next_task += size
            if not chosen:
                return
            futures = self._client.map(functools.partial(_run_batch, fn), [[tasks[i] for i in g] for g in chosen],
                                       key=[f"{name}-{run}-{g[0]}" for g in chosen], pure=False,
                                       resources=self.resources or None)
            for g, fut in zip(chosen, futures):
                groups[fut.key] = g
            queue.update(futures)

        # auto: a few single tasks first, then sizes from their measured times
        submit(window if sizer.fixed else min(window, 2 * self.workers))
        try:
            for done in queue.batches():
                for fut, (values, seconds) in done:  # an errored task raises its exception here
                    group = groups.pop(fut.key)
                    fut.release()
                    sizer.record(len(group), seconds)
                    for i, value in zip(group, values):
                        results[i] = value
                        if on_result is not None:
                            on_result(i, value)
                if len(groups) <= refill_at:
                    submit(window - len(groups))
        except BaseException:
            pending = list(getattr(queue, "futures", ()))
            if pending:
                self._client.cancel(pending)
            raise
        return results

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    def __enter__(self) -> "DaskExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _run_batch(fn: Callable[[Any], Any], tasks: list[Any]) -> tuple[list[Any], float]:
    """Run one Dask task's cases; their results and the seconds they took (for :class:`BatchSizer`)."""
    t0 = time.perf_counter()
    return [fn(task) for task in tasks], time.perf_counter() - t0


#: ``batch="auto"``: the work one Dask task aims at (seconds) ...
AUTO_BATCH_SECONDS = 0.2
#: ... and the most cases it holds.
AUTO_BATCH_MAX = 64


class BatchSizer:
    """How many cases go into the next Dask task.

    A fixed ``batch`` (an int) is used as given. ``"auto"`` starts with one
    case per Dask task and, once tasks have come back, puts as many cases into
    one Dask task as take about :data:`AUTO_BATCH_SECONDS` by the median
    measured time per case (at most :data:`AUTO_BATCH_MAX`), so the engine's
    cost of a few milliseconds per Dask task stays below about 2 % of the work,
    and a lost worker loses at most about that much work. Cases that take
    longer than that (CT-sized volumes, model inference) stay one per Dask
    task. Near the end the size shrinks so that the remaining cases still
    spread over all workers (at least two Dask tasks per worker).
    """

    def __init__(self, batch: int | str, workers: int) -> None:
        if batch == "auto":
            self.fixed: int | None = None
        elif isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
            self.fixed = batch
        else:
            raise ValueError(f"batch must be 'auto' or an integer >= 1, got {batch!r}")
        self.workers = max(1, int(workers))
        self._per_case: collections.deque[float] = collections.deque(maxlen=32)

    def record(self, cases: int, seconds: float) -> None:
        """One Dask task of ``cases`` cases took ``seconds`` on its worker."""
        if cases > 0:
            self._per_case.append(max(0.0, seconds) / cases)

    def next_size(self, remaining: int) -> int:
        """Cases for the next Dask task, with ``remaining`` cases not yet submitted."""
        if remaining < 1:
            return 0
        if self.fixed is not None:
            return min(self.fixed, remaining)
        if not self._per_case:
            return 1
        per_case = statistics.median(self._per_case)
        size = AUTO_BATCH_MAX if per_case <= 0 else int(AUTO_BATCH_SECONDS / per_case)
        tail = -(-remaining // (2 * self.workers))  # ceil: keep >= 2 Dask tasks per worker
        return max(1, min(size, AUTO_BATCH_MAX, tail))


def dask_security(address: str, *, ca_file: str | Path | None = None, cert: str | Path | None = None,
                  key: str | Path | None = None, insecure: bool = False) -> Any:
    """The ``distributed.security.Security`` to reach the scheduler at ``address`` with, or None.

    * ``tls://`` (and ``wss://``): mutual TLS with encryption required. The CA
      that signed the cluster's certificates, this client's certificate and its
      key come from ``ca_file``, ``cert`` and ``key``, or, when none is given,
      from Dask's own configuration (``distributed.comm.tls.*``).
    * ``tcp://`` (or no scheme): refused unless the host is this machine's
      loopback (``127.0.0.1``, ``::1``, ``localhost``) or ``insecure`` is true;
      certificate files with a plain address are an error, not ignored.
    * ``inproc://``: this process only; None.

    Raises ValueError (one line) on a refused address, a missing file, or a
    ``tls://`` address without certificates.
    """
    _import_distributed()
    from distributed.comm import parse_address, parse_host_port
    from distributed.security import Security

    files = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    try:
        scheme, location = parse_address(str(address))
    except ValueError as exc:
        raise ValueError(f"--scheduler {address}: {exc}") from None
    if scheme in _ENCRYPTED_SCHEMES:
        for option, path in files.items():
            if path is not None and not Path(path).is_file():  # never opens a FIFO or a device
                raise ValueError(f"{option} {path}: not a file")
        if any(files.values()):
            if ca_file is None or cert is None:
                raise ValueError(f"--scheduler {address}: TLS needs {_TLS_OPTIONS} (the key may sit in the "
                                 "certificate file)")
            security = Security(require_encryption=True, tls_ca_file=str(ca_file), tls_client_cert=str(cert),
                                tls_client_key=str(key) if key is not None else None)
        else:
            security = Security(require_encryption=True)  # the files named in Dask's configuration
            if not (security.tls_ca_file and security.tls_client_cert):
                raise ValueError(f"--scheduler {address}: TLS needs {_TLS_OPTIONS} (or Dask's "
                                 "distributed.comm.tls settings); docs/scale.md")
        return security
    given = [option for option, path in files.items() if path is not None]
    if given:
        raise ValueError(f"{', '.join(given)} need a tls:// scheduler address, not {address}")
    if scheme == "inproc":
        return None
    try:
        host = parse_host_port(location)[0] if location else ""
    except ValueError as exc:
        raise ValueError(f"--scheduler {address}: {exc}") from None
    if not insecure and not is_loopback(host):
        raise ValueError(
            f"--scheduler {address}: a plain {scheme}:// scheduler is unauthenticated and unencrypted (whoever "
            "reaches it can run code on its workers and read what they read); use tls:// with "
            f"{_TLS_OPTIONS} (docs/scale.md), or --insecure on a network you trust")
    return None


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def make_executor(
    kind: str = "local",
    *,
    workers: int = 1,
    scheduler: str | None = None,
    resources: Mapping[str, float] | Sequence[str] | str | None = None,
    batch: int | str = "auto",
    tls_ca_file: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    insecure: bool = False,
    echo: Callable[[str], None] | None = lambda msg: print(msg, file=sys.stderr),
) -> Executor:
    """The executor the CLI options describe (``--executor``, ``--workers``, ``--scheduler``, ``--resources``,
    ``--tls-ca-file``, ``--tls-cert``, ``--tls-key``, ``--insecure``; :func:`dask_security`)."""
    res = dict(resources) if isinstance(resources, Mapping) else parse_resources(resources)
    tls = {"--tls-ca-file": tls_ca_file, "--tls-cert": tls_cert, "--tls-key": tls_key}
    given = [option for option, path in tls.items() if path is not None] + (["--insecure"] if insecure else [])
    if given and not scheduler:
        raise ValueError(f"{', '.join(given)} need --executor dask --scheduler ADDRESS")
    if kind == "local":
        if scheduler:
            raise ValueError("--scheduler needs --executor dask")
        if res:
            raise ValueError("--resources needs --executor dask")
        if batch not in ("auto", 1):
            raise ValueError("--batch needs --executor dask")
        return LocalExecutor(workers)
    if kind == "dask":
        security = None
        if scheduler:
            security = dask_security(scheduler, ca_file=tls_ca_file, cert=tls_cert, key=tls_key, insecure=insecure)
            if insecure and security is None and echo is not None:
                echo(f"warning: --insecure: {scheduler} is reached without authentication or encryption")
        return DaskExecutor(scheduler, workers=workers, resources=res, batch=batch, security=security,
                            insecure=insecure, echo=echo)
    raise ValueError(f"unknown executor {kind!r}: expected 'local' or 'dask'")
