"""Serving benchmark with `vllm bench serve`'s metrics; the same command as `splitserve bench`.

    python scripts/benchmark_serving.py --address 127.0.0.1:50051 --dataset random --request-rate 4
    python scripts/benchmark_serving.py --compare --dataset mixed --request-rate 4 --platform cpu

Run with --help for every flag; the logic lives in splitserve.runtime.serving_bench.
"""

import sys

from splitserve.runtime.cli_bench import main

if __name__ == "__main__":
    sys.exit(main())
