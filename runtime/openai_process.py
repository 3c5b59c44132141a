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

from splitserve.runtime.auth import API_KEY_ENV
from splitserve.runtime.console import print_line
from splitserve.runtime.platform_setup import DIE_WITH_PARENT_ENV
from splitserve.runtime.tls import TLSConfig, is_loopback

START_TIMEOUT_S = 60.0


class OpenAIServerProcess:
    def __init__(self, router_address: str, host: str, port: int, api_key: str | None = None,
                 served_name: str | None = None, tokenizer: str | None = None, shutdown_timeout_s: float = 60.0,
                 tls: TLSConfig = TLSConfig(), tool_call_parser: str | None = None):
        """`tokenizer`: the served model's path (or 'demo'), to name tokens in logprobs by their text;
        `shutdown_timeout_s`: on SIGTERM, how long its requests in flight get (launch's drain timeout);
        `tls`: launch's: the server serves HTTPS with its certificate and checks the router against its CA
        (launch's TLS is mutual, so the CA signed the router's certificate)."""
        self.cmd = [sys.executable, "-m", "splitserve.runtime.cli", "openai-server", "--address",
                    _local(router_address), "--host", host, "--port", str(port),
                    "--shutdown-timeout-s", str(shutdown_timeout_s)]
        if tls.enabled:
            self.cmd += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
        elif not is_loopback(host):  # launch took this host without TLS: it was given --allow-insecure
            self.cmd += ["--allow-insecure"]
        if served_name:
            self.cmd += ["--served-model-name", served_name]
        if tokenizer:
            self.cmd += ["--tokenizer", tokenizer]
        if tool_call_parser:
            self.cmd += ["--tool-call-parser", tool_call_parser]
        self.env = dict(os.environ, **{DIE_WITH_PARENT_ENV: str(os.getpid())})
        self.env.pop(API_KEY_ENV, None)
        if api_key:  # the router's key, by the environment: a flag value would show in `ps`
            self.env[API_KEY_ENV] = api_key
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._forwarder: threading.Thread | None = None

    def start(self) -> None:
        # Its own session, as the workers': a terminal's Ctrl-C reaches launch only, which stops it.
        self.process = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        self._forwarder = threading.Thread(target=self._forward, name="openai-server-output", daemon=True)
        self._forwarder.start()

    def _forward(self) -> None:
        """Its output to launch's stdout, whole lines (console.print_line); the line that says where it
        listens sets `url`. Once launch's stdout is closed the pipe is still read to its end: a child
        blocked on a full pipe stops serving. (A stdout that is open and never read blocks both.)"""
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            if self.url is None and (m := re.search(r"openai-server on (https?://\S+)", line)):
                self.url = m.group(1)
                self._ready.set()
            try:
                print_line(line)
            except (OSError, ValueError):  # launch's stdout closed: keep draining
                pass
        self._ready.set()  # it exited

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Its base URL (http[s]://HOST:PORT/v1) once it listens; RuntimeError if it exits or takes too long."""
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the OpenAI server did not start within {timeout_s:.0f} s")
        if self.url is None:
            raise RuntimeError(f"the OpenAI server exited with status {self.process.wait()} while starting")
        return self.url

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        """SIGTERM: it takes no new requests and finishes those in flight."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns once it has exited and its output is read."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._forwarder is not None:
            self._forwarder.join(5.0)


def _local(address: str) -> str:
    """The router's address as this host reaches it: a wildcard host, or localhost, means 127.0.0.1
    (the name launch's certificate must carry; another loopback address is dialled as bound)."""
    host, port = address.rsplit(":", 1)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "[::]", "::", "localhost") else address
