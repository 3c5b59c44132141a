"""`splitserve` command line. Parses flags and wires objects; logic lives in modules.

JAX is imported only after flags are parsed, because the CPU device count
(--xla_force_host_platform_device_count) must be set before JAX starts.
"""

from __future__ import annotations

import argparse
import sys

from splitserve.runtime import cli_batch, cli_bench, cli_demo, cli_generate, cli_openai, cli_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Disaggregated prefill/decode LLM serving on JAX. "
                    "Run `splitserve COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_batch.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_demo.add_parser(sub)
    cli_generate.add_parser(sub)
    cli_openai.add_parser(sub)
    cli_serve.add_parsers(sub)
    convert = sub.add_parser("convert", help="convert an HF checkpoint directory into an Orbax checkpoint",
                             description="Convert an HF checkpoint (or 'demo') into an Orbax checkpoint "
                                         "that loads faster; serve it with --model OUT_DIR.")
    convert.add_argument("model", help="HF model directory, or 'demo'")
    convert.add_argument("out_dir", help="directory to write the Orbax checkpoint into (must not exist)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                         help="dtype to store (default: the checkpoint's own)")
    convert.set_defaults(run=_run_convert)
    return parser


def _run_convert(args) -> int:
    from pathlib import Path

    from splitserve.models.orbax_checkpoint import convert_to_orbax

    out = Path(args.out_dir)
    if out.exists():
        raise SystemExit(f"splitserve convert: {out} already exists; choose a new directory")
    try:
        convert_to_orbax(args.model, out, dtype=args.dtype)
    except (OSError, ValueError) as e:  # no such model, a checkpoint it cannot read, an output it cannot write
        raise SystemExit(f"splitserve convert: {e}") from None
    print(f"wrote Orbax checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from splitserve.runtime.platform_setup import StopRequested, die_with_parent_if_asked

    die_with_parent_if_asked()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except StopRequested as e:  # a signal while starting: what was started has been stopped on the way out
        sys.stderr.write(f"splitserve: stopped: {e}\n")
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
