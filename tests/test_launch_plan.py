"""Launch planning, what workers are handed (token, TLS), and KV budget arithmetic (no processes)."""

import pytest

from splitserve.models.sharding import MeshConfig
from splitserve.runtime.launch import (LaunchConfig, Launcher, count_tpu_chips, plan_workers, worker_command,
                                      worker_env)
from splitserve.runtime.tls import TLSConfig
from splitserve.runtime.worker import pages_bytes_per_device


def test_gpu_workers_get_disjoint_devices_when_there_are_enough():
    config = LaunchConfig(prefill_workers=2, decode_workers=1, prefill_mesh=MeshConfig(2), decode_mesh=MeshConfig(4))
    specs = plan_workers(config, num_accelerators=8)
    assert [(s.role, s.devices) for s in specs] == [
        ("prefill", (0, 1)), ("prefill", (2, 3)), ("decode", (4, 5, 6, 7))]
    assert len({s.port for s in specs}) == 3


def test_cpu_workers_get_no_accelerators_and_colocated_mode_has_one_role():
    specs = plan_workers(LaunchConfig(mode="colocated", decode_workers=2, decode_mesh=MeshConfig(2)), 0)
    assert [(s.role, s.devices, s.mesh.tp) for s in specs] == [("colocated", (), 2)] * 2
    cmd = worker_command(LaunchConfig(platform="cpu", num_pages=64), specs[0])
    assert cmd[3:4] == ["colocated-worker"] and "--num-pages" in cmd and "tp=2" in cmd


def test_tpu_workers_get_disjoint_aligned_chips_and_their_own_libtpu_port():
    # A v5e-8 style host: prefill on 2 chips, decode on 4. The decode box starts at chip 4, not 2,
    # so its chips form a 2x2 box; nothing is shared and no CUDA variable is set.
    config = LaunchConfig(platform="tpu", prefill_mesh=MeshConfig(2), decode_mesh=MeshConfig(4))
    specs = plan_workers(config, num_accelerators=8)
    assert [(s.role, s.devices) for s in specs] == [("prefill", (0, 1)), ("decode", (4, 5, 6, 7))]
    envs = [worker_env(config, s, False, 2, "token") for s in specs]
    assert [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0,1", "4,5,6,7"]
    assert [e["TPU_CHIPS_PER_PROCESS_BOUNDS"] for e in envs] == ["1,2,1", "2,2,1"]
    assert all(e["TPU_PROCESS_BOUNDS"] == "1,1,1" and "CUDA_VISIBLE_DEVICES" not in e for e in envs)
    ports = [e["TPU_PROCESS_PORT"] for e in envs]
    assert ports[0] != ports[1] and envs[1]["TPU_PROCESS_ADDRESSES"] == f"localhost:{ports[1]}"


def test_tpu_chips_are_never_shared_and_v3_chips_hold_two_devices():
    four_by_two = LaunchConfig(platform="tpu", prefill_mesh=MeshConfig(4), decode_mesh=MeshConfig(4))
    with pytest.raises(ValueError, match="need 8 TPU chips of their own .* has 4"):
        plan_workers(four_by_two, num_accelerators=4)
    # TPU v3: two devices per chip, so tp=4 is 2 chips and both workers fit on a v3-8 (4 chips).
    specs = plan_workers(four_by_two, num_accelerators=4, devices_per_chip=2)
    assert [s.devices for s in specs] == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="1, 2, 4 or 8 chips, not 3"):
        plan_workers(LaunchConfig(platform="tpu", decode_mesh=MeshConfig(3)), num_accelerators=8)
    # No TPU on this machine: the count comes back empty rather than starting a TPU runtime.
    assert count_tpu_chips()[0] == 0


def test_page_bytes_are_per_device():
    # 4 layers, 8 KV heads, 16 tokens, head_dim 32, f32: K and V.
    assert pages_bytes_per_device(4, 8, 16, 32, 4, tp=1) == 2 * 4 * 8 * 16 * 32 * 4
    assert pages_bytes_per_device(4, 8, 16, 32, 4, tp=4) == 2 * 4 * 2 * 16 * 32 * 4


def test_workers_get_the_token_in_their_environment_and_tls_paths_in_argv(monkeypatch):
    monkeypatch.setenv("SPLITSERVE_API_KEY", "public-key")
    tls = TLSConfig("/pki/leaf.crt", "/pki/leaf.key", "/pki/ca.crt")
    config = LaunchConfig(host="0.0.0.0", tls=tls, api_key="public-key")
    spec = plan_workers(config, 0)[0]
    launcher = Launcher(config)
    token = launcher.security.token
    assert len(token) >= 32 and Launcher(config).security.token != token  # fresh per run
    cmd = worker_command(config, spec)
    env = worker_env(config, spec, False, 2, token)
    assert env["SPLITSERVE_INTERNAL_TOKEN"] == token and "SPLITSERVE_API_KEY" not in env
    assert not any(token in arg or "public-key" in arg for arg in cmd)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # only the router listens on --host
    assert cmd[cmd.index("--tls-ca") + 1] == "/pki/ca.crt" and cmd[cmd.index("--tls-key") + 1] == "/pki/leaf.key"
    assert "public-key" not in repr(config) and token not in repr(launcher.security)


def test_launch_with_tls_needs_the_internal_ca():
    with pytest.raises(ValueError, match="needs --tls-ca"):
        LaunchConfig(tls=TLSConfig("/pki/leaf.crt", "/pki/leaf.key"))


def test_workers_get_the_drain_timeout_and_bad_values_are_refused():
    config = LaunchConfig(platform="cpu", drain_timeout_s=7.5)
    cmd = worker_command(config, plan_workers(config, 0)[0])
    assert cmd[cmd.index("--drain-timeout-s") + 1] == "7.5"
    with pytest.raises(ValueError, match="drain_timeout_s"):
        LaunchConfig(drain_timeout_s=-1)
    with pytest.raises(ValueError, match="max_restarts"):
        LaunchConfig(max_restarts=-1)


def test_decode_workers_get_the_kv_transport():
    config = LaunchConfig(platform="cpu", kv_transport="grpc")
    prefill, decode = plan_workers(config, 0)
    assert "--kv-transport" not in worker_command(config, prefill)  # a decode worker's flag only
    cmd = worker_command(config, decode)
    assert cmd[cmd.index("--kv-transport") + 1] == "grpc" and "--kv-data-port" not in cmd  # any free port
    default = worker_command(LaunchConfig(platform="cpu"), decode)
    assert default[default.index("--kv-transport") + 1] == "socket"
    with pytest.raises(ValueError, match="kv_transport"):
        LaunchConfig(kv_transport="udp")


def test_worker_ports_are_picked_outside_the_ephemeral_range_and_never_twice():
    """A worker binds its port seconds after launch picks it; a pick from the ephemeral range could
    be taken meanwhile by any port-0 bind (the router's own, a KV data socket): seen in CI."""
    import socket

    from splitserve.runtime.launch import EPHEMERAL_RANGE_FILE, free_port

    with open(EPHEMERAL_RANGE_FILE) as f:
        ephemeral_low = int(f.read().split()[0])
    with socket.socket() as taken:  # a port-0 bind made while picks are outstanding
        taken.bind(("127.0.0.1", 0))
        ports = [free_port("127.0.0.1") for _ in range(50)]
        assert taken.getsockname()[1] not in ports
    assert len(set(ports)) == len(ports)
    assert all(p < ephemeral_low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # each was free when handed out


def test_prefix_caching_flags_reach_prefill_and_colocated_workers_only():
    from splitserve.runtime.cli import build_parser
    from splitserve.runtime.cli_serve import launch_config
    from splitserve.runtime.worker import WorkerConfig

    def launch(*flags):
        return launch_config(build_parser().parse_args(["launch", "--platform", "cpu", *flags]))

    assert launch().prefix_cache_gib == 0
    assert launch("--enable-prefix-caching").prefix_cache_gib == 0.25
    config = launch("--prefix-cache-gib", "0.5")
    prefill, decode = plan_workers(config, 0)
    cmd = worker_command(config, prefill)
    assert cmd[cmd.index("--prefix-cache-gib") + 1] == "0.5"
    assert "--prefix-cache-gib" not in worker_command(config, decode)
    colocated = launch("--mode", "colocated", "--enable-prefix-caching")
    cmd = worker_command(colocated, plan_workers(colocated, 0)[0])
    assert cmd[cmd.index("--prefix-cache-gib") + 1] == "0.25"
    assert "--prefix-cache-gib" not in worker_command(LaunchConfig(platform="cpu"), prefill)
    with pytest.raises(SystemExit, match="turns it on and off"):
        launch("--enable-prefix-caching", "--prefix-cache-gib", "0")
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit, match="a number >= 0"):
            launch("--prefix-cache-gib", bad)
    with pytest.raises(SystemExit):  # argparse: a decode worker has no such flag
        build_parser().parse_args(["decode-worker", "--enable-prefix-caching"])
    with pytest.raises(ValueError, match="not a decode worker"):
        WorkerConfig(role="decode", prefix_cache_gib=0.5)


def test_prefill_chunk_flag_reaches_prefill_and_colocated_workers_only():
    from splitserve.runtime.cli import build_parser
    from splitserve.runtime.cli_serve import launch_config

    def launch(*flags):
        return launch_config(build_parser().parse_args(["launch", "--platform", "cpu", *flags]))

    assert launch().prefill_chunk_tokens == 0
    config = launch("--prefill-chunk-tokens", "256")
    prefill, decode = plan_workers(config, 0)
    cmd = worker_command(config, prefill)
    assert cmd[cmd.index("--prefill-chunk-tokens") + 1] == "256"
    assert "--prefill-chunk-tokens" not in worker_command(config, decode)
    colocated = launch("--mode", "colocated", "--prefill-chunk-tokens", "512")
    cmd = worker_command(colocated, plan_workers(colocated, 0)[0])
    assert cmd[cmd.index("--prefill-chunk-tokens") + 1] == "512"
    assert "--prefill-chunk-tokens" not in worker_command(launch(), prefill)
    args = build_parser().parse_args(["prefill-worker", "--prefill-chunk-tokens", "64"])
    assert args.prefill_chunk_tokens == 64
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SystemExit):  # argparse: an integer >= 0
            launch("--prefill-chunk-tokens", bad)
    with pytest.raises(SystemExit):  # a decode worker has no such flag
        build_parser().parse_args(["decode-worker", "--prefill-chunk-tokens", "64"])
