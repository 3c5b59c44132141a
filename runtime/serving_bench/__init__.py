"""Serving benchmark (`splitserve bench`, `scripts/benchmark_serving.py`), metrics as `vllm bench serve`.

    workloads.py     requests to send: random token ids, ShareGPT text, mixed short/long
    arrivals.py      when to send them: Poisson / gamma (burstiness) arrival offsets
    driver.py        sends them to a router through AsyncClient, timing every streamed chunk
    metrics.py       per-request TTFT/TPOT/ITL/E2E and the run's summary (percentiles, goodput)
    interference.py  TPOT of short requests decoding while a long prompt is prefilled
    report.py        the printed tables and the JSON document
    plots.py         latency CDFs and latency-vs-rate PNGs (matplotlib, Agg)
    sweep.py         one router: build the workload, warm up, one run per request rate
    compare.py       colocated vs disaggregated stacks on the same devices, one workload
    session.py       one `splitserve bench` invocation: flags -> specs -> runs -> outputs
"""
