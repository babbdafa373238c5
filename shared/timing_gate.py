"""Run several scoring processes at once but time them one at a time: eval-all scores JOBS artifacts in parallel
(each process on NPROC/JOBS threads: two one-thread processes do 1.3x the work of one two-thread process on a
2-core machine), yet latency and throughput are measured by one process with the others paused (SIGSTOP), so
the figures mean what they say.

The protocol: a worker that reaches its timing calls `wait_for_the_cpu()`, which prints READY and waits for a line
on stdin; the driver (`run_gated`) pauses every other worker, answers with their pids, and resumes them when the
timed worker exits. New workers start only while nobody is timed."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

READY = "@@eval-ready-to-time"


def wait_for_the_cpu(settle_seconds: float = 2.0) -> int:
    """Ask the driver for the CPU; return how many other workers were verifiably paused while we time.

    SIGSTOP takes effect asynchronously, so wait (briefly) until every peer shows as stopped before timing."""
    print(READY, flush=True)
    pids = [int(p) for p in sys.stdin.readline().split()]  # the pids the driver paused (none when alone)
    deadline = time.time() + settle_seconds
    while not all(_is_stopped(p) for p in pids) and time.time() < deadline:
        time.sleep(0.01)
    return sum(1 for pid in pids if _is_stopped(pid))


def _is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class Worker:
    """One worker process; a thread forwards its stdout lines to the driver's queue."""

    def __init__(self, item: dict, args: list[str], cwd: Path, env: dict, events: queue.Queue):
        import tempfile
        import threading

        self.item, self.lines = item, []
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty stderr cannot block it
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events):
        for line in self.proc.stdout:
            if line.strip() == READY:
                events.put(("ready", self))
            else:
                self.lines.append(line.rstrip("\n"))
        events.put(("done", self, self.proc.wait()))

    def grant(self, paused: list[int]):
        try:
            self.proc.stdin.write(" ".join(map(str, paused)) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died meanwhile; its "done" event follows

    def signal(self, sig):
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def error_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


def can_pause() -> bool:
    return hasattr(signal, "SIGSTOP")


def run_gated(items: list[dict], command: Callable[[dict], list[str]], jobs: int, cwd: Path, env: dict,
              on_done: Callable[[Worker, int], None]) -> None:
    """Run `command(item)` for every item, `jobs` at a time, granting the CPU to one READY worker at a time;
    `on_done(worker, returncode)` is called as each one finishes."""
    events, pending, running, waiting = queue.Queue(), list(items), [], []
    timing = None

    def grant(worker):
        others = [w for w in running if w is not worker]
        for w in others:
            w.signal(signal.SIGSTOP)
        worker.signal(signal.SIGCONT)
        worker.grant([w.proc.pid for w in others])
        return worker

    try:
        while pending or running:
            while pending and len(running) < jobs and timing is None:  # nothing new starts while one is timed
                item = pending.pop(0)
                running.append(Worker(item, command(item), cwd, env, events))
            kind, worker, *rest = events.get()
            if kind == "ready":
                if timing is None:
                    timing = grant(worker)
                else:
                    waiting.append(worker)
                continue
            running.remove(worker)
            if worker is timing:
                timing = None
            if worker in waiting:
                waiting.remove(worker)
            if timing is None:
                if waiting:
                    timing = grant(waiting.pop(0))
                else:
                    for w in running:
                        w.signal(signal.SIGCONT)
            on_done(worker, rest[0])
    finally:  # never leave a paused worker behind (Ctrl-C reaches the workers too, once they run again)
        for w in running:
            w.signal(signal.SIGCONT)
