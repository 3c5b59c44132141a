"""`launch --openai-port`: `splitserve openai-server` as a child process of launch, in front of its router.

A process of its own, as each worker is: its event loop and HTTP handling stay off the router's
cores and threads. It dies with launch (the parent-death signal, as workers do), its output goes
to launch's, and launch stops it before the router drains, so no new HTTP request arrives then.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from splitserve.runtime.auth import API_KEY_ENV
from splitserve.runtime.platform_setup import DIE_WITH_PARENT_ENV

START_TIMEOUT_S = 60.0


class OpenAIServerProcess:
    def __init__(self, router_address: str, host: str, port: int, api_key: str | None = None,
                 served_name: str | None = None, tokenizer: str | None = None):
        """`tokenizer`: the served model's path (or 'demo'), to name tokens in logprobs by their text."""
        cmd = [sys.executable, "-m", "splitserve.runtime.cli", "openai-server", "--address",
               _local(router_address), "--host", host, "--port", str(port)]
        if tokenizer:
            cmd += ["--tokenizer", tokenizer]
        if served_name:
            cmd += ["--served-model-name", served_name]
        env = dict(os.environ, **{DIE_WITH_PARENT_ENV: str(os.getpid())})
        env.pop(API_KEY_ENV, None)
        if api_key:  # the router's key, by the environment: a flag value would show in `ps`
            env[API_KEY_ENV] = api_key
        self.url: str | None = None
        self._ready = threading.Event()
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._forward, name="openai-server-output", daemon=True).start()

    def _forward(self) -> None:
        """Its lines to launch's stdout; the first that says where it listens sets `url`."""
        for line in self.process.stdout:
            if self.url is None and (m := re.search(r"openai-server on (http://\S+)", line)):
                self.url = m.group(1)
                self._ready.set()
            sys.stdout.write(line)
            sys.stdout.flush()
        self._ready.set()  # it exited

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Its base URL (http://HOST:PORT/v1) once it listens; RuntimeError if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI server did not start within {timeout_s:.0f} s")
        if self.url is None:
            raise RuntimeError(f"the OpenAI server exited with status {self.process.wait()} while starting")
        return self.url

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _local(address: str) -> str:
    """The router's address as this host reaches it: a wildcard host means loopback."""
    host, port = address.rsplit(":", 1)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "[::]", "::") else address
