"""Flags of the commands that talk to a router (generate, batch): the API key and TLS."""

from __future__ import annotations

import os

from splitserve.runtime.auth import API_KEY_ENV


def add_router_client_flags(p) -> None:
    p.add_argument("--api-key", help=f"API key for the router (with --address; default ${API_KEY_ENV}; "
                   "prefer the variable: a flag value shows in `ps`)")
    p.add_argument("--tls", action="store_true", help="talk TLS to the router, verified with the system's roots")
    p.add_argument("--tls-ca", metavar="PEM", help="talk TLS to the router, verified with this CA certificate")


def client_options(args) -> dict:
    """Client(...) keyword arguments from the flags."""
    return dict(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                tls=args.tls_ca or (True if args.tls else None))
