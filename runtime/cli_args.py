"""Argument types shared by the `splitserve` commands."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes and counts: a page size of 0 would divide by zero deep inside)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0: off)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: gRPC would wrap 70000 to 4464, and -1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


DEFAULT_PREFIX_CACHE_GIB = 0.25


def add_prefix_cache_flags(p, which: str) -> None:
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help=f"keep the KV of recent prompts' whole blocks of --page-size tokens on {which}, so a "
                        "prompt that starts like an earlier one (a system prompt, few-shot examples, a chat's "
                        f"history) computes only the rest ({DEFAULT_PREFIX_CACHE_GIB} GiB per device unless "
                        "--prefix-cache-gib says otherwise)")
    p.add_argument("--prefix-cache-gib", type=float, metavar="GIB",
                   help="memory per device for the prefix cache; turns it on (0: off)")


def add_prefill_chunk_flag(p) -> None:
    p.add_argument("--prefill-chunk-tokens", type=non_negative_int, default=0, metavar="N",
                   help="chunked prefill: a prompt longer than N tokens is prefilled N tokens at a time, and "
                        "other prompts (and, colocated, decode steps) run between its chunks, so one long "
                        "prompt does not stall them (default 0: off)")


def prefix_cache_gib(args, command: str) -> float:
    """The prefix cache's GiB per device from the flags above (0: off)."""
    if args.prefix_cache_gib is None:
        return DEFAULT_PREFIX_CACHE_GIB if args.enable_prefix_caching else 0.0
    if not (math.isfinite(args.prefix_cache_gib) and args.prefix_cache_gib >= 0):
        raise SystemExit(f"splitserve {command}: --prefix-cache-gib must be a number >= 0, got {args.prefix_cache_gib}")
    if args.enable_prefix_caching and args.prefix_cache_gib == 0:
        raise SystemExit(f"splitserve {command}: --enable-prefix-caching with --prefix-cache-gib 0 turns it on "
                         "and off; give one of them")
    return args.prefix_cache_gib
