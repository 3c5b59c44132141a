"""Admission (drain), the router's worker health and launch's supervisor, without a model.

Real gRPC servers on loopback and real child processes; only the clock of the supervisor is
a fake one, so its backoff can be stepped through without waiting.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime.drain import Admission, NotAdmitted, State
from splitserve.runtime.grpc_common import ChannelPool, add_health, make_server, set_serving
from splitserve.runtime.router_server import RouterServer
from splitserve.runtime.supervisor import RESTART_BACKOFF_S, Supervisor, WorkerDied
from splitserve.runtime.worker_health import WorkerHealth


@pytest.fixture
def health_server():
    server = make_server(max_workers=4)
    servicer = add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield server, servicer, f"127.0.0.1:{port}"
    server.stop(0)


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


# -- Admission -------------------------------------------------------------------------------
def test_admission_follows_starting_serving_draining_and_health_with_it(health_server):
    _, servicer, address = health_server
    admission = Admission(servicer, "test server")
    with pytest.raises(NotAdmitted, match="test server is starting"):
        admission.enter()
    assert health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    admission.open()
    assert health_of(address) == health_pb2.HealthCheckResponse.SERVING
    admission.enter()
    admission.start_draining()
    assert health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(NotAdmitted, match="test server is draining"):
        admission.enter()
    admission.leave()
    assert admission.state is State.DRAINING and admission.in_flight == 0


def test_drain_waits_for_work_in_flight_and_for_idle():
    admission = Admission(None, "x")
    admission.open()
    admission.enter()
    busy = threading.Event()
    busy.set()
    threading.Timer(0.3, admission.leave).start()
    threading.Timer(0.6, busy.clear).start()
    start = time.monotonic()
    assert admission.drain(10.0, idle=lambda: not busy.is_set())
    assert 0.55 < time.monotonic() - start < 5.0


def test_drain_gives_up_after_its_timeout():
    admission = Admission(None, "x")
    admission.open()
    admission.enter()  # never leaves
    start = time.monotonic()
    assert not admission.drain(0.3)
    assert 0.3 <= time.monotonic() - start < 2.0


# -- WorkerHealth ----------------------------------------------------------------------------
def test_worker_health_takes_a_worker_back_only_once_it_serves(health_server):
    server, servicer, address = health_server
    taken_back = []
    channels = ChannelPool()
    health = WorkerHealth([address], channels, on_up=taken_back.append)
    try:
        assert health.is_up(address)
        health.mark_down(address, "Reserve: connection reset")
        assert not health.is_up(address) and "connection reset" in health.down()[address]
        set_serving(servicer, False)
        assert not health.probe(address) and not health.is_up(address)
        assert health.down()[address] == "reports NOT_SERVING"
        set_serving(servicer, True)
        assert health.probe(address) and health.is_up(address)
        assert taken_back == [address]
        assert health.probe(address) and taken_back == [address]  # already up: on_up is not called again
        server.stop(0)
        assert not health.probe(address) and not health.is_up(address)
    finally:
        channels.close()


def test_worker_health_prober_runs_in_the_background(health_server):
    _, servicer, address = health_server
    channels = ChannelPool()
    health = WorkerHealth([address], channels, interval_s=0.05)
    health.start()
    try:
        set_serving(servicer, False)
        deadline = time.monotonic() + 5
        while health.is_up(address):
            assert time.monotonic() < deadline, "the prober did not notice NOT_SERVING"
            time.sleep(0.02)
        set_serving(servicer, True)
        while not health.is_up(address):
            assert time.monotonic() < deadline, "the prober did not take the worker back"
            time.sleep(0.02)
    finally:
        health.stop()
        channels.close()


class _StatsOnly(internal_pb2_grpc.PrefillServicer, internal_pb2_grpc.DecodeServicer):
    def Stats(self, request, context):
        return internal_pb2.WorkerStats(free_pages=64, total_pages=64)


def _health_only_server():
    """Health and Stats, what the router asks of a worker before it takes it (back)."""
    server = make_server(max_workers=4)
    servicer = add_health(server)
    internal_pb2_grpc.add_PrefillServicer_to_server(_StatsOnly(), server)
    internal_pb2_grpc.add_DecodeServicer_to_server(_StatsOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    set_serving(servicer, True)
    return server, servicer, f"127.0.0.1:{port}"


def _wait_for_health(address: str, status: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while health_of(address) != status:
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_router_health_is_not_serving_while_every_prefill_or_every_decode_worker_is_down():
    """A load balancer reads the router's health: with no prefill worker (or no decode worker)
    up, no request can be served, so the router reports NOT_SERVING until one is back."""
    prefill = [_health_only_server() for _ in range(2)]
    decode = _health_only_server()
    router = RouterServer("demo", host="127.0.0.1", port=0, prefill=[p[2] for p in prefill], decode=[decode[2]],
                          colocated=[])
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        router.start(worker_timeout_s=10)
        assert health_of(router.address) == SERVING
        set_serving(prefill[0][1], False)  # one prefill worker of two: still able to serve
        deadline = time.monotonic() + 5
        while router.router.health.is_up(prefill[0][2]):
            assert time.monotonic() < deadline, "the prober did not notice the first prefill worker"
            time.sleep(0.02)
        assert health_of(router.address) == SERVING
        prefill[1][0].stop(0)  # the second one dies: no prefill worker left
        _wait_for_health(router.address, NOT_SERVING, "the router still reports SERVING with no prefill worker")
        set_serving(prefill[0][1], True)
        _wait_for_health(router.address, SERVING, "the router did not report SERVING once a prefill worker was back")
        set_serving(decode[1], False)  # its only decode worker
        _wait_for_health(router.address, NOT_SERVING, "the router still reports SERVING with no decode worker")
        set_serving(decode[1], True)
        _wait_for_health(router.address, SERVING, "the router did not report SERVING once the decode worker was back")
        router.drain(0)  # draining wins over able workers
        assert health_of(router.address) == NOT_SERVING
    finally:
        router.stop(0)
        for server, _, _ in prefill + [decode]:
            server.stop(0)


# -- Supervisor ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wait_exit(worker) -> None:
    worker.process.wait(10)


def test_supervisor_restarts_a_dead_worker_after_a_backoff_and_gives_up_past_the_limit():
    clock = FakeClock()
    supervisor = Supervisor(max_restarts=2, clock=clock)
    exits = [sys.executable, "-c", "import sys; sys.exit(3)"]
    worker = supervisor.start("flaky", exits, env={})
    try:
        for restart in range(2):
            first_pid = worker.process.pid
            _wait_exit(worker)
            supervisor.supervise()  # found dead: a restart is scheduled, not done yet
            assert worker.process.pid == first_pid and worker.restart_at == clock.now + RESTART_BACKOFF_S[restart]
            clock.now += RESTART_BACKOFF_S[restart] - 0.1
            supervisor.supervise()
            assert worker.process.pid == first_pid
            clock.now += 0.2
            supervisor.supervise()
            assert worker.process.pid != first_pid and worker.restarts == restart + 1
        _wait_exit(worker)
        with pytest.raises(WorkerDied, match="flaky exited with code 3 after 2 restarts"):
            supervisor.supervise()
    finally:
        supervisor.stop(5)


def test_supervisor_clears_the_count_of_a_worker_that_stays_up_and_stop_ends_every_process():
    from splitserve.runtime.supervisor import RESTART_COUNT_RESET_S

    clock = FakeClock()
    supervisor = Supervisor(max_restarts=1, clock=clock)
    worker = supervisor.start("steady", [sys.executable, "-c", "import time; time.sleep(60)"], env={})
    worker.restarts = 1
    clock.now += RESTART_COUNT_RESET_S + 1
    supervisor.supervise()
    assert worker.restarts == 0
    supervisor.check_alive()
    pid = worker.process.pid
    supervisor.stop(5)
    assert worker.process.returncode is not None
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_a_drain_waits_for_a_run_that_passed_admission_but_has_not_reached_the_engine():
    """Run checked admission, then went on to the engine: a drain starting in between saw an idle
    engine and returned, and the worker stopped under the Run."""
    import concurrent.futures
    import types

    from splitserve.protos import internal_pb2
    from splitserve.runtime.prefill_service import PrefillService

    inside, release = threading.Event(), threading.Event()

    class SlowToSubmit:  # the window between the admission check and the engine holding the job
        config = types.SimpleNamespace(vocab_size=100, eos_token_ids=(2,))
        runner = types.SimpleNamespace(model=types.SimpleNamespace(config=config), max_model_len=64)

        def submit(self, job):
            inside.set()
            release.wait(10)
            done = concurrent.futures.Future()
            done.set_result(7)
            return done

    context = types.SimpleNamespace(add_callback=lambda cb: None, time_remaining=lambda: None,
                                    abort=lambda code, details: (_ for _ in ()).throw(RuntimeError(details)))
    SAMPLING = internal_pb2.ResolvedSampling(max_tokens=4, top_p=1.0, seed=1)
    admission = Admission(None, "prefill")
    admission.open()
    service = PrefillService(SlowToSubmit(), admission, mesh="tp=1", platform="cpu")
    answers = []
    run = threading.Thread(target=lambda: answers.append(service.Run(
        internal_pb2.PrefillRequest(request_id="r", prompt_ids=[5, 6], sampling=SAMPLING), context)))
    run.start()
    assert inside.wait(5)
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    assert admission.drain(10.0, idle=lambda: True)  # the engine looks idle throughout
    assert time.monotonic() - start > 0.4, "the drain did not wait for the Run in flight"
    run.join(5)
    assert answers[0].first_token == 7
    with pytest.raises(RuntimeError, match="draining"):  # and a new one is refused
        service.Run(internal_pb2.PrefillRequest(request_id="s", prompt_ids=[5], sampling=SAMPLING), context)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_worker_does_not_outlive_a_supervisor_killed_with_sigkill(tmp_path):
    """launch SIGKILLed (no chance to stop its children): each splitserve child it started gets
    SIGTERM from the kernel. The child asks for it itself, at start (no preexec_fn)."""
    import os
    import signal

    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from splitserve.runtime.supervisor import Supervisor\n"
        "child = [sys.executable, '-m', 'splitserve.runtime.cli', 'router', '--colocated', '127.0.0.1:1', '--port', '0']\n"
        "worker = Supervisor().start('router', child, env=dict(os.environ))\n"
        "print(worker.process.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, SPLITSERVE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu"))
    child = int(parent.stdout.readline())
    try:
        time.sleep(3)  # past its start-up; one killed earlier is caught by its parent-pid check instead
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its supervisor"
            time.sleep(0.1)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_child_whose_supervisor_died_before_it_started_stops_at_once():
    import os

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is no longer this child's parent
    result = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "--help"], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, SPLITSERVE_DIE_WITH_PARENT=str(gone.pid)))
    assert result.returncode == 143 and "has exited; stopping" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_child_started_through_a_wrapper_that_forks_still_runs():
    import os

    command = f"{sys.executable} -m splitserve.runtime.cli --help > /dev/null; echo rc=$?"  # bash forks, then waits
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, SPLITSERVE_DIE_WITH_PARENT=str(os.getpid())))
    assert result.stdout.strip() == "rc=0", result.stderr
