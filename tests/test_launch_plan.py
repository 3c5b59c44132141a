"""Launch planning and KV budget arithmetic (no processes)."""

from splitserve.models.sharding import MeshConfig
from splitserve.runtime.launch import LaunchConfig, plan_workers, worker_command
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


def test_page_bytes_are_per_device():
    # 4 layers, 8 KV heads, 16 tokens, head_dim 32, f32: K and V.
    assert pages_bytes_per_device(4, 8, 16, 32, 4, tp=1) == 2 * 4 * 8 * 16 * 32 * 4
    assert pages_bytes_per_device(4, 8, 16, 32, 4, tp=4) == 2 * 4 * 2 * 16 * 32 * 4
