"""Launches a real splitserve stack (router + worker processes) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import grpc

from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2, serving_pb2_grpc
from splitserve.runtime.grpc_common import ChannelPool


class Stack:
    """`lines`: everything launch and its workers printed so far; `credentials`/`metadata`: for a secured router."""

    def __init__(self, process: subprocess.Popen, address: str, lines: list[str], credentials=None, metadata=()):
        self.process = process
        self.address = address
        self.lines = lines
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.metadata = tuple(metadata)
        self.serving = serving_pb2_grpc.ServingStub(self.channel)
        self._worker_channels: ChannelPool | None = None

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid)

    def worker_pid(self, address: str) -> int | None:
        """The pid of the worker process listening on `address` (127.0.0.1:PORT), if one runs."""
        port = address.rsplit(":", 1)[1]
        for pid in self.worker_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode().split("\0")
            except OSError:
                continue
            if "--port" in argv and argv[argv.index("--port") + 1] == port:
                return pid
        return None

    def worker_environ(self, pid: int) -> dict[str, str]:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().decode().split("\0")
        return dict(item.split("=", 1) for item in items if "=" in item)

    def internal_token(self) -> str:
        """The token launch handed its workers, read from a worker's environment."""
        return self.worker_environ(self.worker_pids()[0])["SPLITSERVE_INTERNAL_TOKEN"]

    def worker_channel(self, address: str) -> grpc.Channel:
        """A plaintext channel to a worker that sends the internal token, as the router does."""
        if self._worker_channels is None:
            self._worker_channels = ChannelPool(token=self.internal_token())
        return self._worker_channels.get(address)

    def close(self) -> None:
        self.channel.close()
        if self._worker_channels is not None:
            self._worker_channels.close()

    def generate(self, prompt_ids=None, text=None, **sampling):
        request = serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(**sampling))
        if text is not None:
            request.text = text
        else:
            request.token_ids.ids.extend(prompt_ids)
        tokens, out_text, reason = [], "", ""
        for msg in self.serving.Generate(request, timeout=120, metadata=self.metadata):
            tokens += msg.token_ids
            out_text += msg.text
            reason = msg.finish_reason or reason
        return tokens, out_text, reason

    def workers(self):
        return list(self.serving.ModelInfo(serving_pb2.ModelInfoRequest(), timeout=10, metadata=self.metadata).workers)

    def kv_transfers(self) -> dict[tuple[str, str, str], float]:
        """KV transfers ended, summed over the workers of each role: {(role, direction, transport): count}.
        Needs a stack launched with --metrics-port."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        line = next(line for line in self.lines if line.startswith("splitserve metrics:"))
        counts: dict[tuple[str, str, str], float] = {}
        for role, url in re.findall(r"(prefill|decode|colocated) \S+ (http\S+/metrics)", line):
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "splitserve_kv_transfers_total":
                        key = (role, sample.labels["direction"], sample.labels["transport"])
                        counts[key] = counts.get(key, 0.0) + sample.value
        return counts

    def decode_stats(self):
        """WorkerStats of every decode (or colocated) worker, read from the workers themselves."""
        stats = []
        for w in self.workers():
            if w.role in ("decode", "colocated"):
                stub = internal_pb2_grpc.DecodeStub(self.worker_channel(w.address))
                stats.append(stub.Stats(internal_pb2.StatsRequest(), timeout=10))
        return stats


def _drain(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextlib.contextmanager
def launched(model: str, *flags: str, timeout_s: float = 240, env: dict | None = None, credentials=None,
             metadata=()):
    """`env`: extra environment of launch; `credentials`, `metadata`: how Stack calls the router."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    env.pop("XLA_FLAGS", None)  # each worker sets its own device count
    if "--warmup" not in flags:  # full warm-up is tested on the runner (test_warmup.py); keep CI quick
        flags = ("--warmup", "minimal", *flags)
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "launch", "--model", model, "--port", "0",
           "--platform", "cpu", *flags]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=_drain, args=(process.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    address = None
    started: list[int] = []  # the first workers (they may be killed and restarted since)
    try:
        while address is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("stack did not start:\n" + "".join(lines[-40:]))
            for line in list(lines):
                if m := re.match(r"splitserve ready on (\S+)", line):
                    address = m.group(1)
            time.sleep(0.1)
        stack = Stack(process, address, lines, credentials, metadata)
        started = _children(process.pid)
        yield stack
        stack.close()
    finally:
        workers = sorted(set(_children(process.pid)) | set(started))
        assert address is None or workers, "a launched stack must have worker processes"
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        _assert_gone(workers)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _assert_gone(pids: list[int], timeout_s: float = 15.0) -> None:
    """No worker process may outlive launch."""
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
        time.sleep(0.1)
    assert not alive, f"worker processes {alive} outlived launch"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
