#!/usr/bin/env python3
"""Example worker for the workflows in examples/: serves the queues greet, enrich, flaky, echo, noop.

    python3 examples/workers/python_worker.py --server http://127.0.0.1:7233 --queue greet --queue enrich

Without --queue it serves them all. Its handlers answer as those of the demo worker built into
`sluice dev`; run that with `--no-worker` to have this one do the work. Stop it with Ctrl-C or
SIGTERM: running tasks finish first.

--record FILE appends one JSON line per task received and per task whose completion the server
accepted, each written with fsync, so that a test can prove no step was completed twice:
    {"event": "received" | "completed", "idempotency_key": ..., "workflow_id": ..., "step": ...,
     "trace_id": ...}

--fail-until-attempt N makes the flaky queue fail attempts below N when the task input does not
say otherwise with "succeed_on_attempt".
"""

import argparse
import json
import logging
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))

from sluice_worker import Task, TaskFailure, Worker  # noqa: E402

QUEUES = ("greet", "enrich", "flaky", "echo", "noop")


def make_handlers(fail_until_attempt=None):
    """The handlers by queue. ``fail_until_attempt`` is the flaky queue's default threshold."""

    def greet(task: Task):
        data = task.input if isinstance(task.input, dict) else {}
        name = data.get("name") or "world"
        return {"greeting": f"Hello, {name}"}

    def enrich(task: Task):
        item = task.input
        if isinstance(item, str):
            return {"value": item, "upper": item.upper(), "length": len(item)}
        return {"value": item, "enriched": True}

    def flaky(task: Task):
        data = task.input if isinstance(task.input, dict) else {}
        succeed_on = data.get("succeed_on_attempt", fail_until_attempt)
        if succeed_on is None or task.attempt < int(succeed_on):
            raise TaskFailure(
                "flaky",
                f"attempt {task.attempt} fails on purpose"
                + ("" if succeed_on is None else f" (succeeds from attempt {succeed_on})"),
                details={"attempt": task.attempt},
            )
        return {"ok": True, "attempt": task.attempt}

    def echo(task: Task):
        return task.input

    def noop(task: Task):
        return None

    return {"greet": greet, "enrich": enrich, "flaky": flaky, "echo": echo, "noop": noop}


class Recorder:
    """Appends JSON lines to a file, each flushed and fsynced before the call returns."""

    def __init__(self, path):
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event, task):
        line = json.dumps({
            "event": event,
            "idempotency_key": task.idempotency_key,
            "workflow_id": task.workflow_id,
            "step": task.step,
            "trace_id": task.trace_id,
        })
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self):
        with self._lock:
            self._file.close()


class ExampleWorker(Worker):
    def __init__(self, *args, recorder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder

    def task_received(self, task):
        if self.recorder:
            self.recorder.write("received", task)

    def task_completed(self, task, output):
        if self.recorder:
            self.recorder.write("completed", task)


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve the example queues: " + ", ".join(QUEUES))
    p.add_argument("--server", default=os.environ.get("SLUICE_SERVER", "http://127.0.0.1:7233"),
                   help="Sluice server URL (default: $SLUICE_SERVER or http://127.0.0.1:7233)")
    p.add_argument("--queue", dest="queues", action="append", metavar="NAME", choices=QUEUES,
                   help="queue to serve; repeat for several (default: all)")
    p.add_argument("--concurrency", type=int, default=8, help="tasks run at once (default: 8)")
    p.add_argument("--worker-id", help="name shown in task leases (default: host-pid)")
    p.add_argument("--poll-wait-ms", type=int, default=20000, help="long-poll wait (default: 20000)")
    p.add_argument("--record", metavar="FILE", help="append a JSON line per task received and completed")
    p.add_argument("--fail-until-attempt", type=int, metavar="N",
                   help="flaky queue: fail attempts below N unless the input sets succeed_on_attempt "
                        "(default: fail every attempt)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = make_handlers(args.fail_until_attempt)
    queues = {q: handlers[q] for q in (args.queues or QUEUES)}
    recorder = Recorder(args.record) if args.record else None
    worker = ExampleWorker(
        args.server, queues, concurrency=max(args.concurrency, len(queues)),
        worker_id=args.worker_id, poll_wait_ms=args.poll_wait_ms, recorder=recorder,
    )
    try:
        worker.run()
    finally:
        if recorder:
            recorder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
