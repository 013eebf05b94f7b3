"""Helpers shared by the CLI commands: error reporting and console output."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _os_message(exc: OSError) -> str:
    """``PATH: reason`` for an operating-system error (full disk, name too long, ...)."""
    if exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show Python warnings as one clean line on stderr (``warning: MESSAGE``).

    Python's default shows the file and source line that raised the warning, which
    means nothing to a user of the command line; the previous handler is restored on exit.
    """
    previous = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, their children, ...), read from /proc; [] where
    there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # ended meanwhile
        # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


#: Exit status of a command ended by SIGTERM (128 + the signal's number, as a shell reports it).
TERMINATED_EXIT = 128 + signal.SIGTERM


#: Seconds a command ended by SIGTERM has for its clean-up before it exits regardless.
SIGTERM_GRACE_S = 10.0


def _stop_descendants(sig: int = signal.SIGTERM) -> int:
    stopped = 0
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            stopped += 1
    return stopped


def _stop_the_rest() -> None:
    import time

    deadline = time.monotonic() + SIGTERM_GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
        _stop_descendants()
    _stop_descendants(signal.SIGKILL)
    os._exit(TERMINATED_EXIT)


@contextlib.contextmanager
def stop_children_on_sigterm() -> Iterator[None]:
    """While a command runs, SIGTERM (``kill``, a batch scheduler's time limit) ends it the way
    Ctrl-C does for a terminal's whole process group: every process it started (pool workers,
    nnU-Net and Flower processes, and theirs) gets SIGTERM too, the command's own clean-up runs,
    and it exits with status 143 and one line on stderr; processes started during the clean-up are
    stopped too, and after :data:`SIGTERM_GRACE_S` seconds whatever is left is killed and the
    command exits. Outputs are written atomically, so a re-run resumes. Python's default would end
    this process alone and leave its children running. Only in the main thread (signal handlers
    live there); the previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker inherited the handler: end as Python's default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stopped = _stop_descendants()
        print(f"oarbench: terminated (SIGTERM); stopped {stopped} child process(es); "
              "run the same command again to resume", file=sys.stderr, flush=True)
        # Threads of the command may still start a process (the next round) or wait on one that
        # ignores SIGTERM: stop those too, and end after the grace time whatever still runs.
        threading.Thread(target=_stop_the_rest, name="sigterm-watchdog", daemon=True).start()
        raise SystemExit(TERMINATED_EXIT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_errors(func: F) -> F:
    """Turn the library's errors about inputs and the environment into a clean CLI error.

    ``ValueError`` (bad input, naming the file), ``OSError`` (missing file,
    permissions, full disk, over-long names) and a missing optional dependency
    end in one line on stderr and exit code 1 (click's ClickException);
    tracebacks are kept for bugs.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from oarbench._optional import MissingDependencyError, extra_of, missing_message

        try:
            return func(*args, **kwargs)
        except (ValueError, MissingDependencyError) as exc:
            raise click.ClickException(str(exc)) from exc
        except ModuleNotFoundError as exc:
            # an optional extra imported deep inside the library: one line with the pip command
            if exc.name and extra_of(exc.name):
                ctx = click.get_current_context(silent=True)
                purpose = f"oarbench {ctx.command_path.split(' ', 1)[-1]}" if ctx is not None else None
                raise click.ClickException(missing_message(exc.name, purpose)) from exc
            raise
        except OSError as exc:
            raise click.ClickException(_os_message(exc)) from exc

    return wrapper  # type: ignore[return-value]


class BatchParam(click.ParamType):
    """``--batch``: ``auto`` or a whole number >= 1."""

    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither 'auto' nor a whole number >= 1", param, ctx)


#: Where :func:`executor_options` keeps the scheduler's TLS options for :func:`open_executor`.
_DASK_SECURITY = "oarbench.dask_security"


def executor_options(func: F) -> F:
    """``--executor``, ``--scheduler``, ``--resources``, ``--batch`` and the scheduler's TLS options
    (``--workers`` is each command's own).

    ``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` and ``--insecure`` do not reach the command's
    function: they are kept in the click context, where :func:`open_executor` reads them.
    """

    command = func

    @functools.wraps(command)
    def wrapper(*args: Any, tls_ca_file: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                insecure: bool = False, **kwargs: Any) -> Any:
        given = {"--tls-ca-file": tls_ca_file, "--tls-cert": tls_cert, "--tls-key": tls_key, "--insecure": insecure}
        if any(given.values()) and not kwargs.get("scheduler"):
            named = ", ".join(option for option, value in given.items() if value)
            raise click.UsageError(f"{named}: only with --executor dask --scheduler ADDRESS")
        click.get_current_context().meta[_DASK_SECURITY] = {
            "tls_ca_file": tls_ca_file, "tls_cert": tls_cert, "tls_key": tls_key, "insecure": insecure}
        return command(*args, **kwargs)

    func = wrapper  # type: ignore[assignment]
    func = click.option("--insecure", is_flag=True,
                        help="Allow a plain tcp:// --scheduler that is not on this machine: no authentication, no "
                             "encryption (docs/scale.md).")(func)
    func = click.option("--tls-key", metavar="FILE", default=None,
                        help="This client's private key for a tls:// --scheduler (if not inside --tls-cert).")(func)
    func = click.option("--tls-cert", metavar="FILE", default=None,
                        help="This client's certificate for a tls:// --scheduler, signed by --tls-ca-file's CA.")(func)
    func = click.option("--tls-ca-file", metavar="FILE", default=None,
                        help="CA certificate that signed the Dask cluster's certificates (tls:// --scheduler).")(func)
    func = click.option("--batch", type=BatchParam(), default="auto", show_default=True,
                        help="With --executor dask: cases sent to a worker as one Dask task. auto: one case per "
                             "task when cases take over about 0.2 s, more when they are tiny, sized from the "
                             "measured times; N: always N (docs/scale.md).")(func)
    func = click.option("--resources", "resources", multiple=True, metavar="NAME=N",
                        help="Dask worker resources each task needs, e.g. GPU=1 (with --executor dask).")(func)
    func = click.option("--scheduler", metavar="ADDRESS",
                        help="Address of a running Dask scheduler, e.g. tls://host:8786 with --tls-ca-file, "
                             "--tls-cert and --tls-key (with --executor dask; a plain tcp:// address only on "
                             "127.0.0.1 or with --insecure); without it a local Dask cluster of --workers "
                             "processes is started.")(func)
    func = click.option("--executor", "executor_kind", type=click.Choice(["local", "dask"]), default="local",
                        show_default=True,
                        help="local: this machine's processes; dask: a Dask cluster (docs/scale.md).")(func)
    return func


def open_executor(kind: str, workers: int, scheduler: str | None, resources: tuple[str, ...],
                  batch: int | str = "auto") -> Any:
    """The executor of the CLI options; prints the cluster and dashboard address for Dask."""
    from oarbench.executors import make_executor

    ctx = click.get_current_context(silent=True)
    security = ctx.meta.get(_DASK_SECURITY, {}) if ctx is not None else {}
    return make_executor(kind, workers=workers, scheduler=scheduler, resources=list(resources), batch=batch,
                         echo=lambda msg: click.echo(msg, err=True), **security)
