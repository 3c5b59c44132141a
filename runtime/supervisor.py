"""Keeps launch's worker processes running: restarts a dead one, stops them all in the end.

    launch's main loop, every 0.5 s: supervise()
        a worker exited ──► log it; schedule a restart after a backoff (1 s, 2 s, 4 s ... 30 s)
        its time came   ──► start the same command again (same port, same flags)
        too many restarts in a row ──► raise WorkerDied: launch gives up and stops everything

A worker that stays up for RESTART_COUNT_RESET_S has its count cleared, so a rare crash a
day never adds up to the limit, while a worker that dies at every start is given up on.
While a worker restarts the router skips it (runtime/worker_health.py) and takes it back
once it reports SERVING.

Children ask for a parent-death signal (SIGTERM, so no worker outlives launch even if launch
is killed; runtime/platform_setup.die_with_parent_if_asked) and get a session of their own, so a Ctrl-C in the terminal reaches launch only and
launch decides the order of shutdown: the router drains first, then the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from typing import Callable

from splitserve.runtime.platform_setup import DIE_WITH_PARENT_ENV

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
RESTART_COUNT_RESET_S = 300.0
DEFAULT_MAX_RESTARTS = 5


class WorkerDied(RuntimeError):
    pass


@dataclasses.dataclass
class WorkerProcess:
    name: str  # e.g. "decode-worker --port 4000", for the logs
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row: cleared once it stays up for RESTART_COUNT_RESET_S
    restart_at: float | None = None  # set while it is dead and waits for its restart

    def start(self, clock: Callable[[], float]) -> None:
        env = dict(self.env, **{DIE_WITH_PARENT_ENV: str(os.getpid())})  # the child asks for SIGTERM at our death
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        self.started_at = clock()
        self.restart_at = None


class Supervisor:
    def __init__(self, max_restarts: int = DEFAULT_MAX_RESTARTS, clock: Callable[[], float] = time.monotonic):
        self.max_restarts = max_restarts
        self.clock = clock
        self.workers: list[WorkerProcess] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(name, command, env)
        worker.start(self.clock)
        self.workers.append(worker)
        return worker

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process is not None]

    def check_alive(self) -> None:
        """Raises WorkerDied if a worker has exited (used during start-up: no restarts then)."""
        for w in self.workers:
            if w.process.poll() is not None:
                raise WorkerDied(f"worker process {w.name} exited with code {w.process.returncode}")

    def supervise(self) -> None:
        """Restarts workers that exited, after their backoff; raises WorkerDied past max_restarts."""
        now = self.clock()
        for w in self.workers:
            if w.restart_at is None and w.process.poll() is None:
                if w.restarts and now - w.started_at > RESTART_COUNT_RESET_S:
                    w.restarts = 0
                continue
            if w.restart_at is None:  # found dead just now
                if w.restarts >= self.max_restarts:
                    raise WorkerDied(f"worker process {w.name} exited with code {w.process.returncode} "
                                     f"after {w.restarts} restarts in a row; giving up")
                backoff = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
                log.error("worker process %s exited with code %s; restarting it in %.0fs (restart %d of %d)",
                          w.name, w.process.returncode, backoff, w.restarts + 1, self.max_restarts)
                w.restart_at = now + backoff
            elif now >= w.restart_at:
                w.restarts += 1
                w.start(self.clock)
                log.warning("worker process %s restarted (pid %d)", w.name, w.process.pid)

    def kill_all(self) -> None:
        """SIGKILL to every worker still running (a second Ctrl-C: nobody waits for drains)."""
        for w in self.workers:
            if w.process is not None and w.process.poll() is None:
                w.process.kill()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to every worker (each drains), then SIGKILL to any still running after `timeout_s`."""
        for w in self.workers:
            if w.process.poll() is None:
                w.process.terminate()
        deadline = self.clock() + timeout_s
        for w in self.workers:
            try:
                w.process.wait(max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.error("worker process %s did not stop within %.0fs; killing it", w.name, timeout_s)
                w.process.kill()
                w.process.wait()
