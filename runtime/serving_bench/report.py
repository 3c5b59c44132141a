"""What a run prints and writes: vLLM's "Serving Benchmark Result" block, the colocated vs
disaggregated table, and the JSON document (every metric plus every request's record)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from splitserve.runtime.serving_bench.driver import RunResult
from splitserve.runtime.serving_bench.interference import interference
from splitserve.runtime.serving_bench.metrics import PERCENTILES, summarize

SECTIONS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
            ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))


def analyze(run: RunResult, slos: dict[str, float], label: str = "") -> dict:
    """One run's JSON: its summary, the interference metric when it has long requests, its records."""
    doc = dict(label=label, request_rate=_rate_json(run.request_rate),
               metrics=summarize(run.records, run.duration_s, slos))
    if any(r.kind == "long" for r in run.records):
        doc["interference"] = interference(run.records)
    doc["requests"] = [r.to_json() for r in run.records]
    return doc


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _line(name: str, value, fmt: str = ".2f") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return f"{name:<40} {text:<10}"


def result_block(doc: dict, *, max_concurrency: int | None, slos: dict[str, float]) -> str:
    m = doc["metrics"]
    title = " Serving Benchmark Result " + (f"({doc['label']}) " if doc["label"] else "")
    lines = [f"{title:=^50}", _line("Successful requests:", m["completed"], "d"),
             _line("Failed requests:", m["failed"], "d")]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency, "d"))
    if doc["request_rate"] != "inf":
        lines.append(_line("Request rate configured (RPS):", doc["request_rate"]))
    lines += [_line("Benchmark duration (s):", m["duration"]),
              _line("Total input tokens:", m["total_input_tokens"], "d"),
              _line("Total generated tokens:", m["total_output_tokens"], "d"),
              _line("Request throughput (req/s):", m["request_throughput"])]
    if slos:
        lines.append(_line("Request goodput (req/s):", m["request_goodput"]))
    lines += [_line("Output token throughput (tok/s):", m["output_throughput"]),
              _line("Total Token throughput (tok/s):", m["total_token_throughput"])]
    for key, name, header in SECTIONS:
        lines += _section(m, key, name, header)
    if "interference" in doc:
        i = doc["interference"]
        lines += _section(i, "interference_tpot", "TPOT", "Short decodes during long prefills")
        lines += [_line("  (victims / long prefills):", f"{i['victims']} / {i['long_prefills']}", "s")]
        lines += _section(i, "interference_itl", "ITL", "Their gaps during long prefills")
        lines += _section(i, "quiet_tpot", "TPOT", f"Short decodes with no long prefill ({i['quiet']})")
    lines.append("=" * 50)
    return "\n".join(lines)


def _section(stats: dict, key: str, name: str, header: str) -> list[str]:
    lines = [f"{' ' + header + ' ':-^50}", _line(f"Mean {name} (ms):", stats[f"mean_{key}_ms"]),
             _line(f"Median {name} (ms):", stats[f"median_{key}_ms"])]
    return lines + [_line(f"P{p} {name} (ms):", stats[f"p{p}_{key}_ms"]) for p in PERCENTILES]


# (label, where, key, higher is better)
COMPARE_ROWS = (
    ("successful requests", "metrics", "completed", True),
    ("request throughput (req/s)", "metrics", "request_throughput", True),
    ("request goodput (req/s)", "metrics", "request_goodput", True),
    ("output tokens/s", "metrics", "output_throughput", True),
    ("TTFT mean (ms)", "metrics", "mean_ttft_ms", False),
    ("TTFT p99 (ms)", "metrics", "p99_ttft_ms", False),
    ("TPOT mean (ms)", "metrics", "mean_tpot_ms", False),
    ("TPOT p50 (ms)", "metrics", "p50_tpot_ms", False),
    ("TPOT p99 (ms)", "metrics", "p99_tpot_ms", False),
    ("ITL p99 (ms)", "metrics", "p99_itl_ms", False),
    ("E2EL p99 (ms)", "metrics", "p99_e2el_ms", False),
    ("**TPOT p99, shorts during long prefills (ms)**", "interference", "p99_interference_tpot_ms", False),
    ("ITL p99, shorts during long prefills (ms)", "interference", "p99_interference_itl_ms", False),
    ("TPOT p99, shorts with no long prefill (ms)", "interference", "p99_quiet_tpot_ms", False),
    ("victims / long prefills", "interference", ("victims", "long_prefills"), None),
)


def comparison_table(base: dict, other: dict) -> str:
    """Markdown: base (colocated) and other (disaggregated) side by side, with other / base."""
    lines = [f"| metric | {base['label']} | {other['label']} | {other['label']} / {base['label']} |",
             "|---|---|---|---|"]
    for label, where, key, _ in COMPARE_ROWS:
        a, b = base.get(where, {}), other.get(where, {})
        if isinstance(key, tuple):
            cells = [" / ".join(str(d.get(k, "n/a")) for k in key) for d in (a, b)]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | |")
            continue
        x, y = a.get(key), b.get(key)
        if x is None and y is None:
            continue
        ratio = f"{y / x:.2f}x" if x and y is not None else "n/a"
        lines.append(f"| {label} | {_cell(x)} | {_cell(y)} | {ratio} |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def document(runs: list[dict], *, config: dict, model_info, extra: dict | None = None) -> dict:
    config = {k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float, bool, list))}
    info = dict(vars(model_info), workers=[vars(w) for w in model_info.workers]) if model_info else None
    return dict(date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), config=config, model_info=info,
                machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
                runs=runs, **(extra or {}))


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_json_text(doc) + "\n")


def to_json_text(obj, indent: int = 0) -> str:
    """Indented JSON with every list of plain values on one line (per-token timestamps stay compact)."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {to_json_text(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + to_json_text(v, indent + 1) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj)
