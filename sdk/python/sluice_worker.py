"""Sluice worker SDK for Python: poll task queues, run handlers, report results.

One file, standard library only, Python 3.9 or newer. Copy it next to your code or put its
folder on ``sys.path``.

A worker maps queue names to handlers. A handler receives a :class:`Task` and returns the task's
output (anything ``json.dumps`` accepts); raising :class:`TaskFailure` fails the task with an
error type of your choosing, and any other exception fails it with the exception's class name as
the type. Failed tasks are retried by the engine according to the step's retry policy::

    from sluice_worker import TaskFailure, Worker

    def greet(task):
        name = task.input.get("name")
        if not name:
            raise TaskFailure("bad_input", "input needs a name", retryable=False)
        return {"greeting": f"Hello, {name}"}

    Worker(queues={"greet": greet}, concurrency=8).run()   # until SIGINT or SIGTERM

Delivery is at least once: after a worker or server crash the same task can arrive again, with
the same ``task.idempotency_key``. Handlers with side effects should pass that key on (as an
``Idempotency-Key`` header, a unique column, ...) so that a repeat does no harm.

Every task carries the trace id of its execution (``task.trace_id``) and a W3C ``traceparent``
continuing that trace (``task.traceparent``): send the latter on the HTTP calls a handler makes
to join them to the trace. The worker's own log records about a task have a ``trace_id``
attribute (``%(trace_id)s`` in a format string).

:class:`Client` covers the client API: publish workflows, start executions, wait for results,
send signals. Both read the server address from ``SLUICE_SERVER`` (default
``http://127.0.0.1:7233``) and an optional API key from ``SLUICE_API_KEY``, sent as a bearer token
and never logged.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import select
import signal
import socket
import ssl
import threading
import time
import traceback
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["Client", "SluiceError", "Task", "TaskFailure", "Worker", "DEFAULT_SERVER"]

__version__ = "0.1.0"

DEFAULT_SERVER = "http://127.0.0.1:7233"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

log = logging.getLogger("sluice_worker")

# Room on top of a long poll's own wait before the HTTP read gives up.
_POLL_GRACE_S = 15.0
# Largest traceback kept in a failed task's details.
_MAX_TRACEBACK_CHARS = 8000
_USER_AGENT = f"sluice-worker-python/{__version__}"


def _default_server() -> str:
    return os.environ.get("SLUICE_SERVER", DEFAULT_SERVER)


# --------------------------------------------------------------------------------------------
# Errors


class SluiceError(Exception):
    """An error answered by the Sluice server, or the server could not be reached.

    ``code`` is the server's stable snake_case error code (``task_not_found``, ``not_found``, ...)
    or ``connection_failed`` when no answer came back, in which case ``status`` is ``None``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: Optional[int] = None,
        details: Any = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{code} ({status}): {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = details
        #: Seconds the server asked to wait (``Retry-After``), if it said.
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed: no answer, 429 or a 5xx."""
        return self.status is None or self.status == 429 or self.status >= 500


class TaskFailure(Exception):
    """Raise from a handler to fail the task with a chosen error type.

    ``retryable=False`` fails the step at once, whatever its retry policy says; so does a
    ``type`` listed in the policy's ``non_retryable``.
    """

    def __init__(self, type: str, message: str = "", details: Any = None, retryable: bool = True) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.details = details
        self.retryable = retryable

    def to_error(self) -> Dict[str, Any]:
        error: Dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return error


# --------------------------------------------------------------------------------------------
# HTTP transport: one keep-alive connection per thread, abortable long polls


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection was closed by the server (readable means EOF)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare enough to fall back on our own backoff


class _Transport:
    """Sends JSON requests to one server, reusing one connection per calling thread."""

    def __init__(
        self,
        server: str,
        timeout: float,
        api_key: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        parts = urllib.parse.urlsplit(server if "://" in server else f"http://{server}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server must be an http:// or https:// URL, got {server!r}")
        self.server = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self._ssl = ssl_context
        if self._https and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._inflight: "set[http.client.HTTPConnection]" = set()
        # Every open connection with the thread that owns it, to close them when done.
        self._all: "dict[http.client.HTTPConnection, threading.Thread]" = {}
        self._aborted = False

    def __repr__(self) -> str:  # never shows the API key
        return f"<_Transport {self.server}>"

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.sock is None or _dropped(conn.sock)):
            conn.close()
            with self._lock:
                self._all.pop(conn, None)
            conn = None
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                dead = [c for c, t in self._all.items() if not t.is_alive()]
                for c in dead:
                    del self._all[c]
                self._all[conn] = threading.current_thread()
            for c in dead:
                c.close()
        return conn

    def abort_inflight(self) -> None:
        """Breaks off every abortable request now in flight, and refuses new ones."""
        with self._lock:
            self._aborted = True
            conns = list(self._inflight)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        content_type: str = "application/json",
        timeout: Optional[float] = None,
        abortable: bool = False,
    ) -> Any:
        """Sends a request and returns the decoded JSON answer (None when empty).

        Raises SluiceError for an error status (with the server's code) and for a connection
        failure (code ``connection_failed``, status None).
        """
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = content_type
        conn = self._connection()
        registered = False
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(timeout if timeout is not None else self.timeout)
            if abortable:
                with self._lock:
                    if self._aborted:
                        raise SluiceError("connection_failed", "worker is stopping")
                    self._inflight.add(conn)
                    registered = True
            conn.request(method, self._base + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            retry_after = _retry_after(resp.getheader("Retry-After"))
        except SluiceError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise SluiceError("connection_failed", f"{method} {path}: {type(e).__name__}: {e}") from None
        finally:
            if registered:
                with self._lock:
                    self._inflight.discard(conn)
        if 200 <= status < 300:
            if not data:
                return None
            try:
                return json.loads(data)
            except ValueError:
                msg = f"{method} {path}: the server sent invalid JSON"
                raise SluiceError("invalid_response", msg, status) from None
        raise _error_from(status, data, retry_after)

    def close_all(self) -> None:
        """Closes every connection; threads still using the transport open new ones."""
        with self._lock:
            conns = list(self._all)
            self._all.clear()
        for conn in conns:
            conn.close()


def _error_from(status: int, data: bytes, retry_after: Optional[float]) -> SluiceError:
    try:
        err = json.loads(data)["error"]
        return SluiceError(
            str(err.get("code") or f"http_{status}"),
            str(err.get("message") or ""),
            status,
            err.get("details"),
            retry_after,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = data[:200].decode("utf-8", "replace").strip()
        message = text or http.client.responses.get(status, "error")
        return SluiceError(f"http_{status}", message, status, None, retry_after)


def _q(segment: str) -> str:
    """Quotes one path segment: workflow ids of child executions contain `/`."""
    return urllib.parse.quote(str(segment), safe="")


class _Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self, at_least: Optional[float] = None) -> float:
        self.failures += 1
        cap = min(self.maximum, self.initial * (2 ** min(self.failures - 1, 30)))
        delay = random.uniform(cap / 2, cap)
        if at_least is not None:
            delay = max(delay, min(at_least, 60.0))
        return delay

    def reset(self) -> None:
        self.failures = 0


# --------------------------------------------------------------------------------------------
# Client API


class Client:
    """The client API: publish workflows, start executions, wait for results, send signals.

    Methods return the server's JSON answers as dicts and raise :class:`SluiceError` on errors.
    A client can be shared between threads.
    """

    def __init__(
        self,
        server: Optional[str] = None,
        timeout: float = 30.0,
        *,
        api_key: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if api_key is None:
            api_key = os.environ.get("SLUICE_API_KEY") or None
        self._t = _Transport(server or _default_server(), timeout, api_key, ssl_context)

    @property
    def server(self) -> str:
        return self._t.server

    def __repr__(self) -> str:
        return f"Client({self.server!r})"

    def close(self) -> None:
        """Closes the client's connections (they reopen if the client is used again)."""
        self._t.close_all()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        data = None if body is None and method == "GET" else _dumps(body)
        return self._t.request(method, path, data, **kw)

    # Workflows

    def publish(self, definition: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
        """Publishes a workflow definition: a dict, or the text of a YAML or JSON file.

        Returns ``{"name", "version", "created"}``; publishing an identical definition again is
        harmless (``created`` is false).
        """
        if isinstance(definition, str):
            is_json = definition.lstrip().startswith("{")
            ctype = "application/json" if is_json else "application/yaml"
            return self._t.request("POST", "/v1/workflows", definition.encode("utf-8"), ctype)
        return self._call("POST", "/v1/workflows", dict(definition))

    def publish_file(self, path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
        """Publishes a workflow file (`.yaml`, `.yml` or `.json`)."""
        with open(path, encoding="utf-8") as f:
            return self.publish(f.read())

    def workflows(self) -> Any:
        return self._call("GET", "/v1/workflows")

    def workflow(self, name: str) -> Any:
        return self._call("GET", f"/v1/workflows/{_q(name)}")

    # Executions

    def start(
        self,
        workflow: str,
        input: Any = None,
        workflow_id: Optional[str] = None,
        version: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Starts an execution. Returns ``{"workflow_id", "run_id", "status", "created"}``.

        With a ``workflow_id`` of an execution that is still running, nothing new starts and
        ``created`` is false: starting is idempotent, so retrying a start is safe.
        """
        body: Dict[str, Any] = {"workflow": workflow, "input": {} if input is None else input}
        if workflow_id is not None:
            body["workflow_id"] = workflow_id
        if version is not None:
            body["version"] = version
        return self._call("POST", "/v1/executions", body)

    def get(self, workflow_id: str) -> Dict[str, Any]:
        """The latest run of an execution: status, input, output, error, ..."""
        return self._call("GET", f"/v1/executions/{_q(workflow_id)}")

    def result(self, workflow_id: str, wait_ms: int = 30000) -> Dict[str, Any]:
        """Waits up to ``wait_ms`` for the execution (following continue-as-new runs) to end.

        Returns the execution; its ``status`` is still ``running`` if the wait ran out.
        """
        wait_ms = max(0, int(wait_ms))
        path = f"/v1/executions/{_q(workflow_id)}/result?wait_ms={wait_ms}"
        return self._call("GET", path, timeout=wait_ms / 1000 + self._t.timeout)

    def run(
        self,
        workflow: str,
        input: Any = None,
        workflow_id: Optional[str] = None,
        timeout_s: float = 60.0,
    ) -> Dict[str, Any]:
        """Starts an execution and waits until it completes, fails or is cancelled.

        Returns the final execution; check its ``status``. Raises :class:`TimeoutError` if it is
        still running after ``timeout_s``. Connection errors while waiting are retried.
        """
        started = self.start(workflow, input, workflow_id)
        wid = started["workflow_id"]
        deadline = time.monotonic() + timeout_s
        backoff = _Backoff(0.1, 2.0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"execution {wid!r} still running after {timeout_s:g}s")
            try:
                execution = self.result(wid, wait_ms=int(min(left, 30.0) * 1000))
            except SluiceError as e:
                if not e.transient:
                    raise
                time.sleep(min(backoff.next_delay(e.retry_after), max(0.0, deadline - time.monotonic())))
                continue
            backoff.reset()
            if execution.get("status") in TERMINAL_STATUSES:
                return execution

    def history(self, workflow_id: str) -> Any:
        """The latest run's whole history, read a page at a time."""
        base = f"/v1/executions/{_q(workflow_id)}/history"
        page = self._call("GET", f"{base}?limit=1000")
        while page.get("next_after") is not None:
            more = self._call("GET", f"{base}?run_id={_q(page['run_id'])}&after={page['next_after']}&limit=1000")
            page["events"].extend(more.get("events", []))
            page["next_after"] = more.get("next_after")
        return page

    def signal(self, workflow_id: str, name: str, payload: Any = None) -> Any:
        """Sends a signal; the server answers 202 once it is durably recorded."""
        return self._call("POST", f"/v1/executions/{_q(workflow_id)}/signals/{_q(name)}", payload)

    def query(self, workflow_id: str, name: str) -> Any:
        return self._call("GET", f"/v1/executions/{_q(workflow_id)}/queries/{_q(name)}")

    def cancel(self, workflow_id: str) -> Any:
        return self._call("POST", f"/v1/executions/{_q(workflow_id)}/cancel", {})

    # Dead-letter queue

    def dlq(self) -> Any:
        return self._call("GET", "/v1/dlq")

    def redrive(self, workflow_id: str) -> Any:
        return self._call("POST", f"/v1/dlq/{_q(workflow_id)}/redrive", {})


# --------------------------------------------------------------------------------------------
# Worker


class Task:
    """One task handed to a handler: one attempt of one task step of one execution."""

    def __init__(self, data: Mapping[str, Any], transport: Optional[_Transport] = None) -> None:
        self.token: str = data["task_token"]
        self.queue: str = data.get("queue", "")
        self.workflow_id: str = data.get("workflow_id", "")
        self.run_id: str = data.get("run_id", "")
        self.step: str = data.get("step", "")
        self.attempt: int = int(data.get("attempt") or 1)
        self.input: Any = data.get("input")
        #: ``<run_id>/<step>/<attempt>``: the same when a task is delivered again.
        self.idempotency_key: str = data.get("idempotency_key") or self.token
        self.start_to_close_timeout_ms: Optional[int] = data.get("start_to_close_timeout_ms")
        self.heartbeat_timeout_ms: Optional[int] = data.get("heartbeat_timeout_ms")
        #: Trace id of the execution (32 lowercase hex digits); None from servers without one.
        self.trace_id: Optional[str] = data.get("trace_id")
        #: W3C ``traceparent`` continuing the execution's trace: send it on outgoing calls.
        self.traceparent: Optional[str] = data.get("traceparent")
        self.received_at = time.monotonic()
        self._transport = transport
        self._cancel = threading.Event()

    def __repr__(self) -> str:
        return (f"Task(queue={self.queue!r}, workflow_id={self.workflow_id!r}, step={self.step!r}, "
                f"attempt={self.attempt}, trace_id={self.trace_id!r})")

    @property
    def log_extra(self) -> Dict[str, Any]:
        """``extra=`` for :mod:`logging` calls about this task: the record gets ``trace_id``,
        ``workflow_id`` and ``step`` attributes."""
        return {"trace_id": self.trace_id, "workflow_id": self.workflow_id, "step": self.step}

    @property
    def deadline(self) -> Optional[float]:
        """`time.monotonic()` value after which the server times this attempt out, if it will."""
        if self.start_to_close_timeout_ms is None:
            return None
        return self.received_at + self.start_to_close_timeout_ms / 1000

    @property
    def cancel_requested(self) -> bool:
        """True once a heartbeat learned that the server no longer wants this task."""
        return self._cancel.is_set()

    def heartbeat(self, details: Any = None) -> bool:
        """Tells the server the task is alive; returns True if the handler should stop.

        That happens when the execution was cancelled or the task timed out, or the server no
        longer knows the task. A connection error is logged and reported as False: the handler
        keeps working, and the server's heartbeat timeout decides.
        """
        if self._transport is None:
            return self.cancel_requested
        try:
            ans = self._transport.request(
                "POST", "/v1/tasks/heartbeat", _dumps({"task_token": self.token, "details": details})
            )
        except SluiceError as e:
            if e.code == "task_not_found":
                self._cancel.set()
            else:
                log.warning("heartbeat failed: %s (workflow_id=%s step=%s trace_id=%s)", e, self.workflow_id,
                            self.step, self.trace_id, extra=self.log_extra)
            return self.cancel_requested
        except (TypeError, ValueError) as e:
            raise TypeError(f"heartbeat details are not JSON: {e}") from None
        if isinstance(ans, dict) and ans.get("cancel_requested"):
            self._cancel.set()
        return self.cancel_requested


Handler = Callable[[Task], Any]


class Worker:
    """Polls task queues, runs handlers in a thread pool and reports each result.

    ``queues`` maps a queue name to its handler. ``concurrency`` is the most tasks run at once,
    over all queues; the worker never asks for more tasks than it has free slots, so tasks are not
    left waiting on this worker while their timeout runs. Each queue keeps at least one slot
    reserved while it long-polls, so give ``concurrency`` at least the number of queues.

    ``run()`` blocks until ``stop()`` or SIGINT/SIGTERM, then lets running handlers finish and
    report; a second signal ends the process at once. Connection errors never end the loop: they
    are retried with capped exponential backoff.

    Subclasses may override :meth:`task_received`, :meth:`task_completed` and
    :meth:`task_failed` to observe tasks (for metrics or audit logs); they run on handler threads.
    """

    def __init__(
        self,
        server: Optional[str] = None,
        queues: Optional[Mapping[str, Handler]] = None,
        concurrency: int = 4,
        worker_id: Optional[str] = None,
        poll_wait_ms: int = 20000,
        *,
        pollers_per_queue: int = 1,
        api_key: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        timeout: float = 30.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        if not queues:
            raise ValueError("a worker needs at least one queue: queues={'name': handler}")
        for name, handler in queues.items():
            if not callable(handler):
                raise TypeError(f"handler of queue {name!r} is not callable")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if api_key is None:
            api_key = os.environ.get("SLUICE_API_KEY") or None
        self.queues: Dict[str, Handler] = dict(queues)
        self.concurrency = concurrency
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.poll_wait_ms = max(0, int(poll_wait_ms))
        self.pollers_per_queue = max(1, pollers_per_queue)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._t = _Transport(server or _default_server(), timeout, api_key, ssl_context)
        self._slots = threading.BoundedSemaphore(concurrency)
        # A poll asks for at most this many tasks, so that one busy queue cannot hold every slot
        # while the others wait.
        self._max_per_poll = max(1, concurrency // len(self.queues))
        self._stop = threading.Event()
        # Set by the signal handler, which must not take locks; the run loop acts on it.
        self._signalled = 0
        self._running = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None

    @property
    def server(self) -> str:
        return self._t.server

    def __repr__(self) -> str:
        return f"Worker({self.server!r}, queues={sorted(self.queues)!r}, worker_id={self.worker_id!r})"

    # Hooks

    def task_received(self, task: Task) -> None:
        """Called before the handler runs."""

    def task_completed(self, task: Task, output: Any) -> None:
        """Called once the server accepted the task's output."""

    def task_failed(self, task: Task, error: Mapping[str, Any], retryable: bool) -> None:
        """Called once the server accepted the task's failure."""

    # Lifecycle

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Asks the worker to stop: no new polls, in-flight polls broken off, running handlers
        finish and report. Callable from any thread; a worker runs only once."""
        if not self._stop.is_set():
            log.info("worker %s stopping", self.worker_id)
        self._stop.set()
        self._t.abort_inflight()

    def run_in_background(self) -> threading.Thread:
        """Starts ``run()`` in a daemon thread and returns it; stop it with ``stop()``."""
        thread = threading.Thread(target=self.run, name=f"sluice-worker-{self.worker_id}", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Polls and runs tasks until stopped. Handles SIGINT and SIGTERM when called from the
        main thread."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this worker is already running")
        restore = self._install_signal_handlers()
        try:
            self._run()
        finally:
            for signum, previous in restore:
                signal.signal(signum, previous)
            self._running.release()

    def _install_signal_handlers(self) -> List[Tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        restore = []

        def on_signal(signum: int, _frame: Any) -> None:
            # Only a plain assignment here: a handler that takes a lock the interrupted code holds
            # would deadlock. The run loop notices within a tenth of a second.
            if self._signalled:
                os._exit(128 + signum)  # second signal: the user means it
            self._signalled = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                restore.append((signum, signal.signal(signum, on_signal)))
            except (ValueError, OSError):
                pass
        return restore

    def _run(self) -> None:
        log.info(
            "worker %s polling %s on %s (concurrency %d)",
            self.worker_id, ", ".join(sorted(self.queues)), self.server, self.concurrency,
        )
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="sluice-task")
        pollers = []
        try:
            for queue in self.queues:
                for i in range(self.pollers_per_queue):
                    t = threading.Thread(target=self._poll_loop, args=(queue,),
                                         name=f"sluice-poll-{queue}-{i}", daemon=True)
                    t.start()
                    pollers.append(t)
            while not self._stop.is_set():
                if self._signalled:
                    log.info("%s received: finishing running tasks (send it again to exit at once)",
                             signal.Signals(self._signalled).name)
                    self.stop()
                    break
                time.sleep(0.1)
        finally:
            self._stop.set()
            self._t.abort_inflight()
            for t in pollers:
                t.join()
            self._executor.shutdown(wait=True)
            self._executor = None
            self._t.close_all()
            log.info("worker %s stopped", self.worker_id)

    def _take_slots(self) -> int:
        """Waits for one free slot, then takes any others free, up to the per-poll share."""
        while not self._slots.acquire(timeout=0.25):
            if self._stop.is_set():
                return 0
        n = 1
        while n < self._max_per_poll and self._slots.acquire(blocking=False):
            n += 1
        return n

    def _give_slots(self, n: int) -> None:
        for _ in range(n):
            self._slots.release()

    def _poll_loop(self, queue: str) -> None:
        backoff = _Backoff(self.backoff_initial, self.backoff_max)
        handler = self.queues[queue]
        while not self._stop.is_set():
            slots = self._take_slots()
            if slots == 0:
                break
            try:
                answer = self._t.request(
                    "POST",
                    "/v1/tasks/poll",
                    _dumps({"queue": queue, "worker_id": self.worker_id,
                            "max_tasks": slots, "wait_ms": self.poll_wait_ms}),
                    timeout=self.poll_wait_ms / 1000 + _POLL_GRACE_S,
                    abortable=True,
                )
            except SluiceError as e:
                self._give_slots(slots)
                if self._stop.is_set():
                    break
                delay = backoff.next_delay(e.retry_after)
                level = logging.WARNING if backoff.failures <= 3 or backoff.failures % 30 == 0 else logging.DEBUG
                if not e.transient:
                    level = logging.ERROR
                log.log(level, "poll of queue %s failed: %s; retrying in %.1fs", queue, e, delay)
                self._stop.wait(delay)
                continue
            except Exception:  # a bug here must not end the worker
                self._give_slots(slots)
                log.exception("poll of queue %s failed unexpectedly", queue)
                self._stop.wait(backoff.next_delay())
                continue
            if backoff.failures:
                log.info("poll of queue %s works again", queue)
            backoff.reset()
            tasks = answer.get("tasks") if isinstance(answer, dict) else None
            tasks = tasks if isinstance(tasks, list) else []
            if len(tasks) > slots:
                log.warning("server sent %d tasks for %d slots", len(tasks), slots)
            for i, data in enumerate(tasks):
                try:
                    task = Task(data, self._t)
                except (KeyError, TypeError, ValueError):
                    log.error("ignoring a malformed task from queue %s", queue)
                    if i < slots:
                        self._give_slots(1)
                    continue
                if i >= slots:
                    # More than asked for: run it anyway, on a slot that may have to be waited for.
                    while not self._slots.acquire(timeout=0.25):
                        pass
                self._submit(handler, task)
            if len(tasks) < slots:
                self._give_slots(slots - len(tasks))

    def _submit(self, handler: Handler, task: Task) -> None:
        executor = self._executor
        try:
            if executor is None:
                raise RuntimeError("worker is not running")
            executor.submit(self._execute, handler, task)
        except RuntimeError:
            self._slots.release()
            log.error("could not run task %s: worker shut down", task.idempotency_key)

    # Running one task

    def _execute(self, handler: Handler, task: Task) -> None:
        try:
            self._execute_inner(handler, task)
        except Exception:
            log.exception("internal error while running task %s", task.idempotency_key)
        finally:
            self._slots.release()

    def _execute_inner(self, handler: Handler, task: Task) -> None:
        log.debug("running %r", task, extra=task.log_extra)
        try:
            self.task_received(task)
        except Exception:
            log.exception("task_received hook failed")
        started = time.monotonic()
        try:
            output = handler(task)
        except TaskFailure as f:
            self._fail(task, f.to_error(), f.retryable)
            return
        except Exception as e:
            tb = traceback.format_exc()
            if len(tb) > _MAX_TRACEBACK_CHARS:
                tb = "..." + tb[-_MAX_TRACEBACK_CHARS:]
            log.warning("handler of queue %s raised %s (workflow_id=%s step=%s attempt=%d trace_id=%s)",
                        task.queue, type(e).__name__, task.workflow_id, task.step, task.attempt, task.trace_id,
                        extra=task.log_extra)
            error = {"type": type(e).__name__, "message": str(e) or type(e).__name__,
                     "details": {"traceback": tb}}
            self._fail(task, error, True)
            return
        try:
            body = _dumps({"task_token": task.token, "output": output})
        except (TypeError, ValueError) as e:
            error = {"type": "invalid_output", "message": f"handler output is not JSON: {e}"}
            self._fail(task, error, False)
            return
        log.debug("task %s done in %.3fs", task.idempotency_key, time.monotonic() - started,
                  extra=task.log_extra)
        if self._report(task, "/v1/tasks/complete", body):
            try:
                self.task_completed(task, output)
            except Exception:
                log.exception("task_completed hook failed")

    def _fail(self, task: Task, error: Dict[str, Any], retryable: bool) -> None:
        payload = {"task_token": task.token, "error": error, "retryable": retryable}
        try:
            body = _dumps(payload)
        except (TypeError, ValueError):
            error = {k: v for k, v in error.items() if k != "details"}
            payload["error"] = error
            body = _dumps(payload)
        if self._report(task, "/v1/tasks/fail", body):
            try:
                self.task_failed(task, error, retryable)
            except Exception:
                log.exception("task_failed hook failed")

    def _report(self, task: Task, path: str, body: bytes) -> bool:
        """Sends a completion or failure, retrying connection errors while the result can still
        count. Returns whether the server accepted it."""
        backoff = _Backoff(self.backoff_initial, self.backoff_max)
        deadline = task.deadline
        stop_deadline: Optional[float] = None
        while True:
            try:
                self._t.request("POST", path, body)
                return True
            except SluiceError as e:
                if e.code == "task_not_found":
                    hint = " (an earlier try may have been recorded)" if backoff.failures else ""
                    log.warning("task %s is unknown or already finished; dropping its result%s",
                                task.idempotency_key, hint, extra=task.log_extra)
                    return False
                if not e.transient:
                    if path.endswith("/complete") and e.status in (400, 413, 422):
                        # The output was refused (too large, ...): fail the task rather than
                        # leave it to time out.
                        log.error("output of task %s refused: %s", task.idempotency_key, e, extra=task.log_extra)
                        self._fail(task, {"type": "output_rejected", "message": e.message}, False)
                        return False
                    log.error("reporting task %s failed: %s", task.idempotency_key, e, extra=task.log_extra)
                    return False
                now = time.monotonic()
                if self._stop.is_set() and stop_deadline is None:
                    stop_deadline = now + 10.0
                limit = min(x for x in (deadline, stop_deadline, now + 3600.0) if x is not None)
                delay = backoff.next_delay(e.retry_after)
                if now + delay > limit:
                    log.error("giving up reporting task %s: %s; the server will time it out and retry",
                              task.idempotency_key, e, extra=task.log_extra)
                    return False
                log.warning("reporting task %s failed: %s; retrying in %.1fs", task.idempotency_key, e, delay,
                            extra=task.log_extra)
                time.sleep(delay)
