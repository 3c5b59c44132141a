"""scripts/bench_kv_transfer.py end to end on 8 MiB: a real decode worker, both serving transports, the
TCP and bare gRPC ceilings; the JSON last line keeps its keys. No timing asserts (shared machines)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kv_transfer.py"


def test_the_bench_measures_every_path_and_ends_with_its_json_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--kv-mib", "8", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["kv_bytes"] == 8 << 20
    for key in ("transfer_s", "gbytes_per_s", "tcp_gbytes_per_s", "grpc_transfer_s", "grpc_gbytes_per_s",
                "bare_grpc_gbytes_per_s"):
        assert summary[key] > 0, key
    assert abs(summary["gbytes_per_s"] - summary["kv_bytes"] / summary["transfer_s"] / 1e9) < 1e-9
    assert summary["socket_over_tcp"] == summary["gbytes_per_s"] / summary["tcp_gbytes_per_s"]
    table = "\n".join(lines)
    for row in ("data socket (serving)", "gRPC TransferKV (serving)", "bare gRPC", "raw TCP"):
        assert row in table
    assert "peak RSS growth during the socket handoff" in table


def test_sizes_below_one_are_refused_in_one_line():
    for flags in (["--kv-mib", "0"], ["--chunk-kib", "0"]):  # --kv-mib 0 divided by zero at the end
        out = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "must be >= 1" in out.stderr and "Traceback" not in out.stderr
