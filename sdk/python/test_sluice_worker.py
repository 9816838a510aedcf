"""Tests of the Python worker SDK against a fake Sluice server running in-process.

Run with ``python3 -m unittest sdk/python/test_sluice_worker.py -v``; no Sluice server needed.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sluice_worker import Client, SluiceError, Task, TaskFailure, Worker  # noqa: E402

# The worker logs every retried poll; the tests provoke many. `assertLogs` still sees them.
logging.getLogger("sluice_worker").setLevel(logging.CRITICAL)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_WORKER = os.path.join(REPO, "examples", "workers", "python_worker.py")


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def make_task(token, queue, input=None, attempt=1, step="s1", workflow_id="wf-1"):
    run_id = f"run-{workflow_id}"
    return {
        "task_token": token,
        "queue": queue,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "step": step,
        "attempt": attempt,
        "input": input,
        "idempotency_key": f"{run_id}/{step}/{attempt}",
        "start_to_close_timeout_ms": 300000,
        "heartbeat_timeout_ms": None,
        "trace_id": TRACE_ID,
        "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    }


class FakeSluice:
    """Just enough of the Sluice HTTP API: task polling and reporting, and canned client answers.

    ``queued`` holds tasks per queue; a poll takes up to ``max_tasks`` and otherwise waits until
    one arrives or ``wait_ms`` (capped at ``max_wait_s``) passes.
    """

    def __init__(self, port=0, max_wait_s=0.2):
        self.lock = threading.Condition()
        self.queued = {}
        self.leased = {}
        self.completed = {}
        self.failed = {}
        self.heartbeats = []
        self.polls = []
        self.requests = []
        self.cancel_tokens = set()
        self.drop_polls = 0  # close this many poll connections without an answer
        self.error_polls = 0  # answer this many polls with a 503
        self.max_wait_s = max_wait_s
        self.executions = {}
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status, code, message, details=None):
                self._send(status, {"error": {"code": code, "message": message, "details": details}})

            def do_GET(self):
                fake.requests.append(("GET", self.path, self.headers.get("Content-Type"), None))
                fake.route(self, "GET", b"")

            def do_POST(self):
                body = self._body()
                fake.requests.append(("POST", self.path, self.headers.get("Content-Type"), body))
                fake.route(self, "POST", body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that went away (a stopped worker's long poll) are expected

        self.server = Server(("127.0.0.1", port), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add(self, task):
        with self.lock:
            self.queued.setdefault(task["queue"], []).append(task)
            self.lock.notify_all()

    def wait_for(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
        return True

    def route(self, h, method, body):
        path = urlsplit(h.path).path
        req = json.loads(body) if body and h.headers.get("Content-Type") == "application/json" else None
        if path == "/v1/tasks/poll":
            return self.poll(h, req)
        if path in ("/v1/tasks/complete", "/v1/tasks/fail"):
            with self.lock:
                task = self.leased.pop(req["task_token"], None)
                if task is None:
                    return h._error(404, "task_not_found", "task is unknown or already finished")
                if path.endswith("complete"):
                    self.completed[req["task_token"]] = req["output"]
                else:
                    self.failed[req["task_token"]] = req
                self.lock.notify_all()
            return h._send(200, {"ok": True})
        if path == "/v1/tasks/heartbeat":
            with self.lock:
                self.heartbeats.append(req)
                known = req["task_token"] in self.leased
            if not known:
                return h._error(404, "task_not_found", "task is unknown or already finished")
            return h._send(200, {"cancel_requested": req["task_token"] in self.cancel_tokens})
        return self.client_api(h, method, path, req)

    def poll(self, h, req):
        with self.lock:
            self.polls.append(req)
            self.lock.notify_all()
            if self.drop_polls > 0:
                self.drop_polls -= 1
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return None
            if self.error_polls > 0:
                self.error_polls -= 1
                return h._error(503, "unavailable", "storage unavailable, retry later")
            deadline = time.monotonic() + min(req["wait_ms"] / 1000, self.max_wait_s)
            q = self.queued.setdefault(req["queue"], [])
            while not q and time.monotonic() < deadline:
                self.lock.wait(deadline - time.monotonic())
            taken, q[:] = q[: req["max_tasks"]], q[req["max_tasks"]:]
            for t in taken:
                self.leased[t["task_token"]] = t
        return h._send(200, {"tasks": taken})

    def client_api(self, h, method, path, req):
        parts = path.strip("/").split("/")
        if path == "/v1/workflows" and method == "POST":
            return h._send(201, {"name": "hello", "version": "abc", "created": True})
        if path == "/v1/executions" and method == "POST":
            if req["workflow"] == "missing":
                return h._error(404, "workflow_not_found", "workflow `missing` not found", {"name": "missing"})
            wid = req.get("workflow_id") or "wf-generated"
            self.executions[wid] = {"workflow_id": wid, "run_id": "r1", "status": "running", "polls": 0}
            return h._send(201, {"workflow_id": wid, "run_id": "r1", "status": "running", "created": True})
        if len(parts) == 4 and parts[:2] == ["v1", "executions"] and parts[3] == "result":
            ex = self.executions.get(parts[2])
            if ex is None:
                return h._error(404, "execution_not_found", "no such execution")
            ex["polls"] += 1
            wait_ms = int(parse_qs(urlsplit(h.path).query).get("wait_ms", ["0"])[0])
            if ex["polls"] < 3:
                time.sleep(min(wait_ms / 1000, 0.05))
                return h._send(200, dict(ex, status="running"))
            return h._send(200, dict(ex, status="completed", output={"ok": True}))
        if len(parts) == 5 and parts[3] == "signals":
            return h._send(202, {"ok": True})
        if path == "/v1/teapot":
            data = b"short and stout"
            h.send_response(500)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return None
        return h._error(404, "not_found", f"no route {method} {path}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class WorkerTest(unittest.TestCase):
    def start(self, worker):
        thread = worker.run_in_background()
        self.addCleanup(lambda: (worker.stop(), thread.join(10)))
        return thread

    def test_completes_a_task_with_the_handler_output(self):
        seen = []

        def greet(task):
            seen.append(task)
            return {"greeting": f"Hello, {task.input['name']}"}

        with FakeSluice() as fake:
            fake.add(make_task("t1", "greet", {"name": "Ada"}))
            worker = Worker(fake.url, {"greet": greet}, worker_id="test-1", poll_wait_ms=100)
            self.start(worker)
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.completed))
            self.assertEqual(fake.completed["t1"], {"greeting": "Hello, Ada"})
            task = seen[0]
            self.assertIsInstance(task, Task)
            self.assertEqual((task.workflow_id, task.step, task.attempt), ("wf-1", "s1", 1))
            self.assertEqual(task.idempotency_key, "run-wf-1/s1/1")
            self.assertEqual(task.trace_id, TRACE_ID)
            self.assertEqual(task.traceparent, f"00-{TRACE_ID}-00f067aa0ba902b7-01")
            poll = fake.polls[0]
            self.assertEqual(poll["queue"], "greet")
            self.assertEqual(poll["worker_id"], "test-1")
            self.assertEqual(poll["wait_ms"], 100)
            self.assertGreaterEqual(poll["max_tasks"], 1)

    def test_task_failure_sets_type_and_retryable(self):
        def handler(task):
            if task.input == "bad":
                raise TaskFailure("bad_input", "no name given", details={"field": "name"}, retryable=False)
            raise KeyError("boom")

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q", "bad"))
            fake.add(make_task("t2", "q", "other"))
            self.start(Worker(fake.url, {"q": handler}, poll_wait_ms=100))
            self.assertTrue(fake.wait_for(lambda: len(fake.failed) == 2))
            f1 = fake.failed["t1"]
            self.assertEqual(f1["error"],
                             {"type": "bad_input", "message": "no name given", "details": {"field": "name"}})
            self.assertIs(f1["retryable"], False)
            f2 = fake.failed["t2"]
            self.assertEqual(f2["error"]["type"], "KeyError")
            self.assertIs(f2["retryable"], True)
            self.assertIn("traceback", f2["error"]["details"])
            self.assertEqual(fake.completed, {})

    def test_tasks_from_servers_without_trace_ids_still_parse(self):
        data = make_task("t1", "q")
        del data["trace_id"], data["traceparent"]
        task = Task(data)
        self.assertIsNone(task.trace_id)
        self.assertIsNone(task.traceparent)
        self.assertEqual(task.log_extra["trace_id"], None)

    def test_log_records_about_a_task_carry_its_trace_id(self):
        def handler(task):
            raise ValueError("boom")

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q"))
            with self.assertLogs("sluice_worker", "WARNING") as logs:
                self.start(Worker(fake.url, {"q": handler}, poll_wait_ms=100))
                self.assertTrue(fake.wait_for(lambda: "t1" in fake.failed))
            raised = [r for r in logs.records if "raised ValueError" in r.getMessage()]
            self.assertEqual(len(raised), 1, logs.output)
            self.assertEqual(raised[0].trace_id, TRACE_ID)
            self.assertIn(f"trace_id={TRACE_ID}", raised[0].getMessage())

    def test_output_that_is_not_json_fails_without_retry(self):
        with FakeSluice() as fake:
            fake.add(make_task("t1", "q"))
            self.start(Worker(fake.url, {"q": lambda task: {1, 2}}, poll_wait_ms=100))
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.failed))
            self.assertEqual(fake.failed["t1"]["error"]["type"], "invalid_output")
            self.assertIs(fake.failed["t1"]["retryable"], False)

    def test_survives_dropped_connections_and_server_errors(self):
        with FakeSluice() as fake:
            fake.drop_polls = 2
            fake.error_polls = 1
            fake.add(make_task("t1", "q", 41))
            worker = Worker(fake.url, {"q": lambda task: task.input + 1}, poll_wait_ms=100,
                            backoff_initial=0.01, backoff_max=0.05)
            thread = self.start(worker)
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.completed))
            self.assertEqual(fake.completed["t1"], 42)
            self.assertGreaterEqual(len(fake.polls), 4)
            self.assertTrue(thread.is_alive())

    def test_survives_a_server_that_is_not_up_yet(self):
        port = free_port()
        worker = Worker(f"http://127.0.0.1:{port}", {"q": lambda task: "done"}, poll_wait_ms=100,
                        backoff_initial=0.02, backoff_max=0.1)
        thread = self.start(worker)
        time.sleep(0.4)  # several refused connections
        self.assertTrue(thread.is_alive())
        with FakeSluice(port=port) as fake:
            fake.add(make_task("t1", "q"))
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.completed))
            self.assertEqual(fake.completed["t1"], "done")

    def test_never_takes_more_tasks_than_free_slots(self):
        release = threading.Event()
        running = []

        def slow(task):
            running.append(task.token)
            release.wait(5)
            return task.token

        with FakeSluice() as fake:
            for i in range(5):
                fake.add(make_task(f"t{i}", "q"))
            self.start(Worker(fake.url, {"q": slow}, concurrency=2, poll_wait_ms=100))
            self.assertTrue(fake.wait_for(lambda: len(fake.leased) == 2))
            time.sleep(0.3)
            self.assertEqual(len(fake.leased), 2)
            self.assertLessEqual(len(running), 2)
            self.assertTrue(all(p["max_tasks"] <= 2 for p in fake.polls))
            release.set()
            self.assertTrue(fake.wait_for(lambda: len(fake.completed) == 5))

    def test_heartbeat_reports_cancellation(self):
        results = []

        def handler(task):
            results.append(task.heartbeat({"progress": 1}))
            fake.cancel_tokens.add(task.token)
            results.append(task.heartbeat())
            results.append(task.cancel_requested)
            return None

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q"))
            self.start(Worker(fake.url, {"q": handler}, poll_wait_ms=100))
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.completed))
            self.assertEqual(results, [False, True, True])
            self.assertEqual(fake.heartbeats[0], {"task_token": "t1", "details": {"progress": 1}})

    def test_completion_of_an_unknown_task_is_logged_and_dropped(self):
        def handler(task):
            with fake.lock:
                fake.leased.pop(task.token)  # the server timed the task out meanwhile
            return 1

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q"))
            fake.add(make_task("t2", "q"))
            with self.assertLogs("sluice_worker", "WARNING") as logs:
                self.start(Worker(fake.url, {"q": handler}, poll_wait_ms=100))
                self.assertTrue(fake.wait_for(lambda: not fake.queued["q"] and not fake.leased))
                time.sleep(0.2)
            self.assertTrue(any("unknown or already finished" in line for line in logs.output))
            self.assertEqual(fake.completed, {})

    def test_stop_breaks_off_a_long_poll(self):
        with FakeSluice(max_wait_s=30) as fake:
            worker = Worker(fake.url, {"q": lambda task: 1}, poll_wait_ms=30000)
            thread = worker.run_in_background()
            self.assertTrue(fake.wait_for(lambda: fake.polls))
            t0 = time.monotonic()
            worker.stop()
            thread.join(5)
            self.assertFalse(thread.is_alive())
            self.assertLess(time.monotonic() - t0, 3)

    def test_stop_waits_for_running_handlers(self):
        started = threading.Event()

        def slow(task):
            started.set()
            time.sleep(0.3)
            return "finished"

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q"))
            worker = Worker(fake.url, {"q": slow}, poll_wait_ms=100)
            thread = worker.run_in_background()
            self.assertTrue(started.wait(5))
            worker.stop()
            thread.join(5)
            self.assertFalse(thread.is_alive())
            self.assertEqual(fake.completed, {"t1": "finished"})

    def test_hooks_see_received_completed_and_failed(self):
        events = []

        class Recording(Worker):
            def task_received(self, task):
                events.append(("received", task.token))

            def task_completed(self, task, output):
                events.append(("completed", task.token, output))

            def task_failed(self, task, error, retryable):
                events.append(("failed", task.token, error["type"], retryable))

        def handler(task):
            if task.input == "fail":
                raise TaskFailure("nope", "failing on purpose")
            return "ok"

        with FakeSluice() as fake:
            fake.add(make_task("t1", "q", "fine"))
            self.start(Recording(fake.url, {"q": handler}, concurrency=1, poll_wait_ms=100))
            self.assertTrue(fake.wait_for(lambda: "t1" in fake.completed))
            fake.add(make_task("t2", "q", "fail"))
            self.assertTrue(fake.wait_for(lambda: "t2" in fake.failed))
            time.sleep(0.05)
            self.assertEqual(events, [("received", "t1"), ("completed", "t1", "ok"),
                                      ("received", "t2"), ("failed", "t2", "nope", True)])

    def test_rejects_bad_configuration(self):
        with self.assertRaises(ValueError):
            Worker("http://127.0.0.1:1", {})
        with self.assertRaises(TypeError):
            Worker("http://127.0.0.1:1", {"q": "not callable"})
        with self.assertRaises(ValueError):
            Worker("ftp://example", {"q": print})


class ClientTest(unittest.TestCase):
    def client(self, url, **kwargs):
        c = Client(url, **kwargs)
        self.addCleanup(c.close)
        return c

    def test_raises_sluice_error_with_the_server_code(self):
        with FakeSluice() as fake:
            with self.assertRaises(SluiceError) as cm:
                self.client(fake.url).start("missing", {"x": 1})
            e = cm.exception
            self.assertEqual(e.code, "workflow_not_found")
            self.assertEqual(e.status, 404)
            self.assertEqual(e.message, "workflow `missing` not found")
            self.assertEqual(e.details, {"name": "missing"})
            self.assertFalse(e.transient)

    def test_error_without_json_body(self):
        with FakeSluice() as fake:
            with self.assertRaises(SluiceError) as cm:
                self.client(fake.url)._call("GET", "/v1/teapot")
            self.assertEqual((cm.exception.code, cm.exception.status), ("http_500", 500))
            self.assertIn("short and stout", cm.exception.message)
            self.assertTrue(cm.exception.transient)

    def test_connection_failure_is_a_sluice_error(self):
        with self.assertRaises(SluiceError) as cm:
            self.client(f"http://127.0.0.1:{free_port()}", timeout=2).get("x")
        self.assertEqual(cm.exception.code, "connection_failed")
        self.assertIsNone(cm.exception.status)
        self.assertTrue(cm.exception.transient)

    def test_publish_sends_yaml_or_json(self):
        with FakeSluice() as fake:
            c = self.client(fake.url)
            self.assertTrue(c.publish("name: hello\nsteps: []\n")["created"])
            c.publish({"name": "hello", "steps": []})
            c.publish('{"name": "hello"}')
            posts = [r for r in fake.requests if r[1] == "/v1/workflows"]
            self.assertEqual([r[2] for r in posts], ["application/yaml", "application/json", "application/json"])
            self.assertEqual(json.loads(posts[1][3]), {"name": "hello", "steps": []})

    def test_run_waits_for_a_terminal_status(self):
        with FakeSluice() as fake:
            ex = self.client(fake.url).run("hello", {"name": "Ada"}, workflow_id="wf-7", timeout_s=10)
            self.assertEqual(ex["status"], "completed")
            self.assertEqual(ex["output"], {"ok": True})
            self.assertEqual(fake.executions["wf-7"]["polls"], 3)
            start = next(r for r in fake.requests if r[1] == "/v1/executions")
            self.assertEqual(json.loads(start[3]),
                             {"workflow": "hello", "input": {"name": "Ada"}, "workflow_id": "wf-7"})

    def test_signal_quotes_ids_and_sends_the_payload(self):
        with FakeSluice() as fake:
            self.client(fake.url).signal("parent/child step", "approve", {"approved": True})
            method, path, ctype, body = fake.requests[-1]
            self.assertEqual(path, "/v1/executions/parent%2Fchild%20step/signals/approve")
            self.assertEqual(json.loads(body), {"approved": True})

    def test_api_key_is_sent_and_never_shown(self):
        c = Client("http://127.0.0.1:1", api_key="sk-secret")
        self.assertNotIn("sk-secret", repr(c))
        self.assertNotIn("sk-secret", repr(c._t))
        self.assertEqual(c._t._headers["Authorization"], "Bearer sk-secret")


class ExampleWorkerTest(unittest.TestCase):
    """The example worker as a process: records tasks and stops cleanly on SIGTERM."""

    def test_records_tasks_and_stops_on_sigterm(self):
        with FakeSluice() as fake, tempfile.TemporaryDirectory() as tmp:
            record = os.path.join(tmp, "record.jsonl")
            fake.add(make_task("g1", "greet", {"name": "Ada"}))
            fake.add(make_task("f1", "flaky", {"succeed_on_attempt": 2}, attempt=1, step="flaky"))
            fake.add(make_task("f2", "flaky", {"succeed_on_attempt": 2}, attempt=2, step="flaky"))
            fake.add(make_task("e1", "enrich", "ada", step="enrich_all[0]/enrich"))
            fake.add(make_task("x1", "echo", {"a": [1, 2]}, step="echo"))
            proc = subprocess.Popen(
                [sys.executable, EXAMPLE_WORKER, "--server", fake.url, "--record", record,
                 "--poll-wait-ms", "100", "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                ok = fake.wait_for(lambda: len(fake.completed) + len(fake.failed) == 5, timeout=15)
                self.assertTrue(ok, proc.stderr.read1(4096) if proc.poll() is not None else "still running")
            finally:
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=10)
            self.assertEqual(proc.returncode, 0, err.decode())
            self.assertEqual(fake.completed["g1"], {"greeting": "Hello, Ada"})
            self.assertEqual(fake.failed["f1"]["error"]["type"], "flaky")
            self.assertTrue(fake.failed["f1"]["retryable"])
            self.assertEqual(fake.completed["f2"]["attempt"], 2)
            self.assertEqual(fake.completed["e1"], {"value": "ada", "upper": "ADA", "length": 3})
            self.assertEqual(fake.completed["x1"], {"a": [1, 2]})
            with open(record) as f:
                lines = [json.loads(line) for line in f]
            received = sorted(r["idempotency_key"] for r in lines if r["event"] == "received")
            completed = sorted(r["idempotency_key"] for r in lines if r["event"] == "completed")
            self.assertEqual(len(received), 5)
            self.assertEqual(completed, sorted(["run-wf-1/s1/1", "run-wf-1/flaky/2",
                                                "run-wf-1/enrich_all[0]/enrich/1", "run-wf-1/echo/1"]))
            self.assertEqual(set(lines[0]), {"event", "idempotency_key", "workflow_id", "step", "trace_id"})
            self.assertTrue(all(r["trace_id"] == TRACE_ID for r in lines))

    def test_fail_until_attempt_applies_when_input_is_silent(self):
        sys.path.insert(0, os.path.dirname(EXAMPLE_WORKER))
        try:
            import python_worker
        finally:
            sys.path.pop(0)
        flaky = python_worker.make_handlers(fail_until_attempt=3)["flaky"]
        with self.assertRaises(TaskFailure):
            flaky(Task(make_task("t", "flaky", {}, attempt=2)))
        self.assertEqual(flaky(Task(make_task("t", "flaky", {}, attempt=3)))["attempt"], 3)
        always = python_worker.make_handlers()["flaky"]
        with self.assertRaises(TaskFailure) as cm:
            always(Task(make_task("t", "flaky", None, attempt=50)))
        self.assertEqual(cm.exception.type, "flaky")


if __name__ == "__main__":
    unittest.main()
