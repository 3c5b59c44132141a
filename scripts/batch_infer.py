"""Offline batch inference over a JSONL file; the same command as `splitserve batch`.

    python scripts/batch_infer.py --model demo --input requests.jsonl --output results.jsonl
    python -m splitserve.scripts.batch_infer --address 127.0.0.1:50051 --input ... --output ...

Run with --help for the input and output formats; the logic lives in splitserve.runtime.batch_runner.
"""

import sys

from splitserve.runtime.cli_batch import main

if __name__ == "__main__":
    sys.exit(main())
