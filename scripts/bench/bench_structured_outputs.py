"""What structured outputs cost: the same batch free and constrained, side by side in one run.

    python scripts/bench/bench_structured_outputs.py [--batch 32] [--max-tokens 64] [--rounds 3]
                                                     [--json-out scripts/bench/results/structured_cpu.json]

A ColocatedEngine in this process (demo model, no gRPC) generates the same prompts with each mode,
rounds interleaved, after one untimed round of each (compiles). Reported per mode: output tokens,
seconds, output tokens/s and its ratio to free text in the same run, plus the host time the grammar
masks took (GrammarMasks.step_masks / first_masks, timed inside the run) per constrained row and step.
Greedy decoding throughout, so every round of a mode makes the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array",
          "items": {"type": "string"}}}, "required": ["title", "tags"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}
MODES = {  # what each row asks for; free text stops only at EOS or max_tokens, as the others may
    "free": None,
    "regex": {"regex": "[a-z ]+( [A-Z][a-z]+)*"},
    "choice": {"choice": ["the weather was warm and dry all day", "it rained until the evening came"]},
    "json": {"json": SCHEMA},
}


@dataclasses.dataclass(frozen=True)
class Row:
    mode: str
    output_tokens: int
    seconds: float  # median of the rounds
    tokens_per_s: float
    vs_free: float
    mask_us_per_row_step: float  # host time making masks, per constrained row and token


class MaskTimer:
    """Wraps the runner's GrammarMasks methods to add up the host time they take."""

    def __init__(self, grammar):
        self.seconds, self.rows = 0.0, 0
        for name in ("step_masks", "first_masks"):
            setattr(grammar, name, self._timed(getattr(grammar, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            masks = method(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.rows += sum(m is not None for m in masks)
            return masks
        return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    model = load_model("demo", make_mesh(MeshConfig(1)))
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=args.batch * 8 + 8, max_batch=args.batch))
    timer = MaskTimer(engine.runner.grammar)
    prompts = [model.tokenizer.encode(f"Report {i}: the weather in the valley") for i in range(args.batch)]

    def run(mode: str) -> tuple[float, int]:
        params = SamplingParams(max_tokens=args.max_tokens, structured_outputs=MODES[mode])
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)

    for mode in MODES:
        run(mode)  # compiles
    seconds = {mode: [] for mode in MODES}
    tokens, mask_s, mask_rows = {}, dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0)
    for _ in range(args.rounds):
        for mode in MODES:
            before_s, before_rows = timer.seconds, timer.rows
            elapsed, tokens[mode] = run(mode)
            seconds[mode].append(elapsed)
            mask_s[mode] += timer.seconds - before_s
            mask_rows[mode] += timer.rows - before_rows
    free_rate = tokens["free"] / statistics.median(seconds["free"])
    rows = []
    for mode in MODES:
        median = statistics.median(seconds[mode])
        rate = tokens[mode] / median
        rows.append(Row(mode, tokens[mode], round(median, 3), round(rate, 1), round(rate / free_rate, 3),
                        round(1e6 * mask_s[mode] / mask_rows[mode], 1) if mask_rows[mode] else 0.0))
    print(f"batch {args.batch}, max_tokens {args.max_tokens}, demo model (vocab {model.config.vocab_size}), "
          f"median of {args.rounds} rounds")
    print(f"{'mode':8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs free':>8} {'mask us/row/step':>17}")
    for r in rows:
        print(f"{r.mode:8} {r.output_tokens:7d} {r.seconds:8.3f} {r.tokens_per_s:9.1f} {r.vs_free:8.3f} "
              f"{r.mask_us_per_row_step:17.1f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"batch": args.batch, "max_tokens": args.max_tokens,
                                             "rounds": args.rounds, "rows": [dataclasses.asdict(r) for r in rows]},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
