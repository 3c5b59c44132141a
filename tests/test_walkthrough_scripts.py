"""The TPU VM and GPU scripts build command lines that splitserve's own parser accepts, as documented.

Each script runs with SPLITSERVE=echo, so it prints the command it would exec; the line is then
parsed by `splitserve`'s argument parser. (The scripts were also run for real on the CPU: see
scripts/tpu_vm/README.md.)
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from splitserve.runtime.cli import build_parser
from splitserve.runtime.cli_serve import launch_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _parsed(script: str, *flags: str, **env: str):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MODEL", "PLATFORM", "PORT", "HOST", "TLS_CERT", "ALLOW_INSECURE", "INTERNAL_TOKEN_FILE",
                          "KV_DATA_PORT", "KV_TRANSPORT", "MODE")}
    out = subprocess.run(["bash", str(SCRIPTS / script), *flags], env={**clean, "SPLITSERVE": "echo", **env},
                         capture_output=True, text=True, check=True).stdout
    return build_parser().parse_args(shlex.split(out))


def test_single_vm_splits_a_v5e_8_into_two_tpu_meshes_and_flags_win_over_variables():
    args = _parsed("tpu_vm/single_vm.sh")
    assert (args.command, args.platform, args.prefill_mesh.tp, args.decode_mesh.tp, args.port) == \
        ("launch", "tpu", 4, 4, 50051)
    args = _parsed("tpu_vm/single_vm.sh", "--port", "6000", MODEL="demo", PLATFORM="cpu", PREFILL_TP="2", PORT="7000")
    assert (args.model, args.platform, args.prefill_mesh.tp, args.port) == ("demo", "cpu", 2, 6000)


def test_two_vm_workers_listen_off_loopback_with_tls_and_the_token_and_the_router_dials_them():
    secure = dict(TLS_CERT="/pki/s.crt", TLS_KEY="/pki/s.key", TLS_CA="/pki/ca.crt", INTERNAL_TOKEN_FILE="/pki/token")
    for script, command in (("tpu_vm/prefill_host.sh", "prefill-worker"), ("tpu_vm/decode_host.sh", "decode-worker")):
        args = _parsed(script, TP="8", **secure)
        assert (args.command, args.host, args.mesh.tp, args.platform) == (command, "0.0.0.0", 8, "tpu")
        assert (args.tls_ca, args.internal_token_file, args.allow_insecure) == ("/pki/ca.crt", "/pki/token", False)
    assert _parsed("tpu_vm/decode_host.sh", ALLOW_INSECURE="1").allow_insecure
    decode = _parsed("tpu_vm/decode_host.sh", **secure)  # the KV data socket on a port a firewall can name
    assert (decode.kv_transport, decode.kv_data_port) == ("socket", 50063)
    assert _parsed("tpu_vm/decode_host.sh", KV_DATA_PORT="7000", **secure).kv_data_port == 7000
    one_port = _parsed("tpu_vm/decode_host.sh", KV_TRANSPORT="grpc", **secure)  # what decode-worker accepts
    assert (one_port.kv_transport, one_port.kv_data_port) == ("grpc", 0)
    args = _parsed("tpu_vm/router_host.sh", PREFILL_ADDR="10.0.0.2:50061,10.0.0.4:50061", DECODE_ADDR="10.0.0.3:50062")
    assert (args.command, args.prefill, args.decode) == ("router", ["10.0.0.2:50061", "10.0.0.4:50061"],
                                                          ["10.0.0.3:50062"])
    with pytest.raises(subprocess.CalledProcessError):  # no addresses: the script stops and says which
        _parsed("tpu_vm/router_host.sh", DECODE_ADDR="10.0.0.3:50062")
    with pytest.raises(subprocess.CalledProcessError):  # a certificate without its key
        _parsed("tpu_vm/prefill_host.sh", TLS_CERT="/pki/s.crt")


def test_batch_and_single_gpu_scripts():
    args = _parsed("tpu_vm/batch.sh", "in.jsonl", "out.jsonl", ROUTER_ADDR="10.0.0.2:50051", ROUTER_TLS_CA="ca.crt")
    assert (args.command, args.input, args.output, args.address, args.tls_ca) == \
        ("batch", "in.jsonl", "out.jsonl", "10.0.0.2:50051", "ca.crt")
    args = _parsed("gpu/single_gpu.sh")
    assert (args.command, args.platform, args.prefill_mesh.tp, args.decode_mesh.tp) == ("launch", "gpu", 1, 1)
    for script in ("gpu/single_gpu.sh", "tpu_vm/single_vm.sh"):  # the baseline: launch takes no prefill flags
        config = launch_config(_parsed(script, MODE="colocated", DECODE_TP="2"))
        assert (config.mode, config.decode_mesh.tp) == ("colocated", 2)
