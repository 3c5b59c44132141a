"""PNG plots of run documents (report.analyze): latency CDFs, and TTFT/TPOT against request rate.

    latency_cdf.png    empirical CDFs of TTFT, TPOT and E2E latency, one curve per run
    latency_vs_rate.png  mean and p99 TTFT and TPOT against the request rate, one line per
                       series (stack), when a series has two or more finite rates
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

CDF_METRICS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2el_ms", "E2E latency (ms)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_name(doc: dict) -> str:
    rate = doc["request_rate"]
    rate_text = f"{rate:g} req/s" if rate != "inf" else "all at once"
    return f"{doc['label']}, {rate_text}" if doc["label"] else rate_text


def plot_latency_cdfs(docs: list[dict], out_dir: str | Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CDF_METRICS), figsize=(5 * len(CDF_METRICS), 4))
    for ax, (key, title) in zip(axes, CDF_METRICS):
        for doc in docs:
            values = np.sort([r[key] for r in doc["requests"] if r["success"] and r[key] is not None])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=_run_name(doc))
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, plt, out_dir, "latency_cdf.png")


def plot_latency_vs_rate(docs: list[dict], out_dir: str | Path) -> Path | None:
    """None when no series has two or more finite request rates."""
    series: dict[str, list[dict]] = defaultdict(list)
    for doc in docs:
        if doc["request_rate"] != "inf":
            series[doc["label"]].append(doc)
    series = {label: sorted(runs, key=lambda d: d["request_rate"]) for label, runs in series.items() if len(runs) > 1}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for label, runs in series.items():
            rates = [d["request_rate"] for d in runs]
            for stat, style in (("mean", "o-"), ("p99", "s--")):
                ax.plot(rates, [d["metrics"][f"{stat}_{metric}_ms"] for d in runs], style,
                        label=f"{label + ' ' if label else ''}{stat}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, plt, out_dir, "latency_vs_rate.png")


def _save(fig, plt, out_dir: str | Path, name: str) -> Path:
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
