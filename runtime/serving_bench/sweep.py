"""One benchmark against one router: build the workload, warm up, then one run per request rate."""

from __future__ import annotations

import dataclasses

from splitserve.runtime.client import ModelInfo
from splitserve.runtime.serving_bench.driver import Arrivals, Target, fetch_model_info, run_workload
from splitserve.runtime.serving_bench.report import analyze, result_block
from splitserve.runtime.serving_bench.workloads import WorkloadSpec, build_workload


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    workload: WorkloadSpec
    rates: tuple[float, ...] = (float("inf"),)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    num_warmups: int = 0  # requests (same generator, seed + 1, first rate) sent and discarded first
    timeout_s: float | None = None  # per request
    progress: bool = False

    def arrivals(self, rate: float) -> Arrivals:
        return Arrivals(rate, self.burstiness, self.max_concurrency)


def sweep(address: Target, spec: SweepSpec, slos: dict[str, float], *, label: str = "",
          echo=print) -> tuple[list[dict], ModelInfo]:
    """Returns one report.analyze document per rate, and the model info. `address`: a router's, or an
    OpenAI-compatible server (driver.OpenAITarget)."""
    info = fetch_model_info(address)
    model = dict(vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids, max_model_len=info.max_model_len)
    requests = build_workload(spec.workload, seed=spec.seed, **model)
    if spec.workload.dataset == "sharegpt":
        _check_tokenizer(spec.workload.tokenizer, info.name, echo)
    if spec.num_warmups:
        warm = build_workload(spec.workload, seed=spec.seed + 1, num_prompts=spec.num_warmups, **model)
        run = run_workload(address, warm, spec.arrivals(spec.rates[0]), seed=spec.seed + 1, timeout_s=spec.timeout_s,
                           progress=spec.progress)
        failed = sum(not r.success for r in run.records)
        echo(f"warm-up{' (' + label + ')' if label else ''}: {len(warm)} requests in {run.duration_s:.1f}s"
             + (f", {failed} failed" if failed else ""))
    docs = []
    for rate in spec.rates:
        run = run_workload(address, requests, spec.arrivals(rate), seed=spec.seed, timeout_s=spec.timeout_s,
                           progress=spec.progress)
        docs.append(analyze(run, slos, label))
        echo(result_block(docs[-1], max_concurrency=spec.max_concurrency, slos=slos))
    return docs, info


def _check_tokenizer(tokenizer: str, served: str, echo) -> None:
    from splitserve.models.metadata import load_metadata

    name = load_metadata(tokenizer).name
    if name != served:
        echo(f"warning: output lengths are counted with the tokenizer of {name!r} (--tokenizer), but the router "
             f"serves {served!r}")
