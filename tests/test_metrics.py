"""Prometheus metrics: each process's /metrics, scraped over HTTP from a launched stack.

The counts are checked against what the test itself sent: every finished request one TTFT
observation and (n - 1) inter-token ones, every KV transfer counted by the prefill worker that
sent it and the decode worker that received it, rejections by status code, pages back to zero.
"""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.protos import serving_pb2
from splitserve.runtime.metrics import RouterMetrics, WorkerMetrics
from stack import launched


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((f"splitserve_{name}", tuple(sorted(labels.items()))), 0.0)


def endpoints(lines: list[str]) -> dict[str, list[str]]:
    """role -> metrics URLs, from launch's 'splitserve metrics:' line."""
    line = next(line for line in lines if line.startswith("splitserve metrics:"))
    found: dict[str, list[str]] = {"router": re.findall(r"router (http\S+)", line)}
    for role, url in re.findall(r"(prefill|decode) \S+ (http\S+/metrics)", line):
        found.setdefault(role, []).append(url)
    return found


def transfers_ended(samples, direction: str) -> float:
    return (value(samples, "kv_transfer_seconds_count", direction=direction)
            + value(samples, "kv_transfer_failures_total", direction=direction))


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("metrics-cache"))
    with launched("demo", "--metrics-port", "0", "--num-pages", "64", "--page-size", "8") as stack:
        yield stack


def test_metrics_count_what_was_served(metrics_stack):
    urls = endpoints(metrics_stack.lines)
    assert len(urls["router"]) == 1 and len(urls["prefill"]) == 1 and len(urls["decode"]) == 1
    before = {role: scrape(u[0]) for role, u in urls.items()}

    served, max_tokens = 3, 6
    for i in range(served):
        tokens, _, reason = metrics_stack.generate([1, 5 + i, 9, 12], max_tokens=max_tokens, ignore_eos=True)
        assert len(tokens) == max_tokens and reason == "length"
    with pytest.raises(grpc.RpcError) as bad:
        metrics_stack.generate([1, 2], max_tokens=0)
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=[1, 2, 3]),
                                          sampling=serving_pb2.SamplingParams(max_tokens=500, ignore_eos=True))
    stream = metrics_stack.serving.Generate(request)
    next(stream)
    stream.cancel()

    deadline = time.monotonic() + 10
    while True:  # the cancel reaches the router's metrics and the decode worker's pages asynchronously
        after = {role: scrape(u[0]) for role, u in urls.items()}
        delta = {role: {k: v - before[role].get(k, 0.0) for k, v in s.items()} for role, s in after.items()}
        router, prefill, decode = delta["router"], delta["prefill"], delta["decode"]
        settled = (value(router, "request_rejected_total", code="CANCELLED") == 1
                   and value(after["decode"], "kv_pages_used") == 0
                   and transfers_ended(prefill, "sent") == transfers_ended(decode, "received") == served + 1)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert value(router, "request_success_total", finished_reason="length") == served
    assert value(router, "request_rejected_total", code="INVALID_ARGUMENT") == 1
    assert value(router, "request_rejected_total", code="CANCELLED") == 1
    assert value(router, "time_to_first_token_seconds_count") == served + 1  # the cancelled one had its first
    assert value(router, "e2e_request_latency_seconds_count") == served
    assert value(router, "generation_tokens_total") >= served * max_tokens + 1
    assert value(router, "prompt_tokens_total") == served * 4 + 3  # the invalid request never reached prefill
    assert value(after["router"], "num_requests_running") == 0
    assert value(after["router"], "num_requests_waiting") == 0

    # The cancelled request's KV may or may not have landed before its reservation was released.
    assert value(prefill, "prefill_queue_time_seconds_count") == served + 1
    for role, direction in ((prefill, "sent"), (decode, "received")):
        assert transfers_ended(role, direction) == served + 1
        assert value(role, "kv_transfer_seconds_count", direction=direction) >= served
    assert value(prefill, "kv_transfer_failures_total", direction="sent") == \
        value(decode, "kv_transfer_failures_total", direction="received")
    sent = value(prefill, "kv_transfer_bytes_total", direction="sent")
    assert sent > 0 and sent == value(decode, "kv_transfer_bytes_total", direction="received")
    assert value(after["decode"], "kv_pages_total") == metrics_stack.decode_stats()[0].total_pages
    assert value(after["decode"], "kv_pages_used") == 0
    assert value(after["decode"], "decode_requests_running") == 0


def test_decode_pages_in_use_show_while_a_request_runs(metrics_stack):
    url = endpoints(metrics_stack.lines)["decode"][0]
    request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=list(range(3, 30))),
                                          sampling=serving_pb2.SamplingParams(max_tokens=200, ignore_eos=True))
    stream = metrics_stack.serving.Generate(request)
    next(stream)
    during = scrape(url)
    stream.cancel()
    pages = -(-(27 + 200) // 8)  # the reservation covers prompt + max_tokens
    assert value(during, "kv_pages_used") == pages
    assert value(during, "kv_cache_usage_perc") == pytest.approx(pages / metrics_stack.decode_stats()[0].total_pages)


def test_requests_in_line_for_decode_pages_show_until_they_leave(metrics_stack):
    """A holder takes 51 of the 64 pages; a second request (38 pages) waits in line, and the router's
    gauge counts it until its cancel takes it out."""
    url = endpoints(metrics_stack.lines)["router"][0]

    def request(max_tokens):
        return serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=[1, 2, 3]),
                                           sampling=serving_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    def in_line(want):
        deadline = time.monotonic() + 10
        while (got := value(scrape(url), "num_requests_waiting_for_kv_pages")) != want:
            assert time.monotonic() < deadline, f"{got} in line, not {want}"
            time.sleep(0.05)

    holder = metrics_stack.serving.Generate(request(400))
    next(holder)
    waiter = metrics_stack.serving.Generate(request(300))
    try:
        in_line(1)
        waiter.cancel()
        in_line(0)
    finally:
        waiter.cancel()
        holder.cancel()
    decode = endpoints(metrics_stack.lines)["decode"][0]
    deadline = time.monotonic() + 10
    while value(scrape(decode), "kv_pages_used"):  # the next test starts from an idle stack
        assert time.monotonic() < deadline, "the holder's pages were not freed"
        time.sleep(0.05)


def test_request_timer_observes_once_per_event():
    metrics = RouterMetrics()
    timer = metrics.start_request()
    assert metrics.waiting._value.get() == 1
    timer.prefill_sent(7)
    for _ in range(4):
        timer.tokens(1)
    assert metrics.running._value.get() == 1 and metrics.waiting._value.get() == 0
    timer.close(finish_reason="stop")
    timer.close(error_code="CANCELLED")  # the end-of-call callback after a normal finish: ignored

    def sample(name, **labels):
        return metrics.registry.get_sample_value(f"splitserve_{name}", labels)

    assert sample("time_to_first_token_seconds_count") == 1
    assert sample("inter_token_latency_seconds_count") == 3
    assert sample("request_success_total", finished_reason="stop") == 1
    assert sample("request_rejected_total", code="CANCELLED") is None
    assert sample("prompt_tokens_total") == 7 and sample("generation_tokens_total") == 4
    assert metrics.running._value.get() == 0


def test_failed_kv_transfer_is_counted_as_a_failure_not_bytes():
    metrics = WorkerMetrics()
    with pytest.raises(ConnectionError):
        with metrics.kv_transfer("sent") as timer:
            timer.bytes = 1234
            raise ConnectionError("cut")
    with metrics.kv_transfer("sent") as timer:
        timer.bytes = 100
    get = metrics.registry.get_sample_value
    assert get("splitserve_kv_transfer_failures_total", {"direction": "sent"}) == 1
    assert get("splitserve_kv_transfer_bytes_total", {"direction": "sent"}) == 100
    assert get("splitserve_kv_transfer_seconds_count", {"direction": "sent"}) == 1


def test_inter_token_latency_is_measured_within_each_of_n_sequences():
    """n > 1 interleaves sequences on one call: a gap is measured from the same sequence's last
    token, and a later sequence's first token is no gap at all."""
    metrics = RouterMetrics()
    timer = metrics.start_request()
    for sequence in (0, 1, 2, 0, 1, 0):
        timer.tokens(1, sequence)
        time.sleep(0.002)
    itl = metrics.registry.get_sample_value("splitserve_inter_token_latency_seconds_count")
    ttft = metrics.registry.get_sample_value("splitserve_time_to_first_token_seconds_count")
    assert (ttft, itl) == (1, 3)  # 0->0, 1->1, 0->0; not the first tokens of sequences 1 and 2
    # the 0 -> 0 gaps spanned two other tokens: at least 3 sleeps each
    assert metrics.registry.get_sample_value("splitserve_inter_token_latency_seconds_bucket", {"le": "0.005"}) <= 1
