"""One `splitserve bench` invocation: flags -> specs -> runs -> table, JSON and plots."""

from __future__ import annotations

from splitserve.models.mesh_config import MeshConfig
from splitserve.runtime.cli_args import prefix_cache_gib
from splitserve.runtime.client import ModelInfo
from splitserve.runtime.serving_bench.arrivals import parse_rates
from splitserve.runtime.serving_bench.compare import CompareSpec, compare
from splitserve.runtime.serving_bench.metrics import parse_goodput
from splitserve.runtime.serving_bench.openai_driver import OpenAITarget, model_card
from splitserve.runtime.serving_bench.report import comparison_table, document, write_json
from splitserve.runtime.serving_bench.sweep import SweepSpec, sweep
from splitserve.runtime.serving_bench.workloads import MixedSpec, WorkloadSpec


def sweep_spec(args) -> SweepSpec:
    mixed = MixedSpec(long_fraction=args.mixed_long_fraction, short_input_len=args.mixed_short_input_len,
                      short_output_len=args.mixed_short_output_len, long_input_len=args.mixed_long_input_len,
                      long_output_len=args.mixed_long_output_len)
    workload = WorkloadSpec(dataset=args.dataset, num_prompts=args.num_prompts, random_input_len=args.random_input_len,
                            random_output_len=args.random_output_len, random_prefix_len=args.random_prefix_len,
                            range_ratio=args.random_range_ratio,
                            dataset_path=args.dataset_path, sharegpt_output_len=args.sharegpt_output_len,
                            sharegpt_max_output_len=args.sharegpt_max_output_len, mixed=mixed,
                            tokenizer=args.tokenizer or args.model or "demo")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    return SweepSpec(workload=workload, rates=tuple(parse_rates(args.request_rate)), burstiness=args.burstiness,
                     max_concurrency=args.max_concurrency, seed=args.seed, num_warmups=args.num_warmups,
                     timeout_s=args.timeout, progress=not args.disable_tqdm)


def compare_spec(args) -> CompareSpec:
    return CompareSpec(model=args.model or "demo", platform=args.platform, dtype=args.dtype,
                       prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
                       prefill_mesh=MeshConfig.parse(args.prefill_mesh), decode_mesh=MeshConfig.parse(args.decode_mesh),
                       colocated_mesh=MeshConfig.parse(args.colocated_mesh), page_size=args.page_size,
                       max_batch=args.max_batch, kv_cache_gib=args.kv_cache_gib, num_pages=args.num_pages,
                       warmup=args.warmup, prefix_cache_gib=prefix_cache_gib(args, "bench"),
                       prefill_chunk_tokens=args.prefill_chunk_tokens)


def openai_target(base_url: str, model: str, served_name: str | None = None, echo=print) -> OpenAITarget:
    """An OpenAI-compatible server, with the facts of the checkpoint it serves (`model`: a directory or
    'demo'); the key is $OPENAI_API_KEY, else $SPLITSERVE_API_KEY."""
    import os

    from splitserve.models.metadata import load_metadata
    from splitserve.runtime.auth import API_KEY_ENV

    api_key = os.environ.get("OPENAI_API_KEY") or os.environ.get(API_KEY_ENV) or None
    card = model_card(base_url, api_key)
    cfg = load_metadata(model).config
    context = cfg.max_model_len
    if isinstance(card.get("max_model_len"), int) and card["max_model_len"] != context:
        echo(f"warning: {base_url} serves a context of {card['max_model_len']} tokens, --model {model} has "
             f"{context}; the workload keeps to the smaller")
        context = min(context, card["max_model_len"])
    info = ModelInfo(served_name or card["id"], cfg.family, cfg.vocab_size, context, "", 0,
                     list(cfg.eos_token_ids), [], "openai", False)
    return OpenAITarget(base_url, info.name, info, api_key)


def run_session(args) -> int:
    slos = parse_goodput(args.goodput)
    spec = sweep_spec(args)
    if not args.compare and (args.enable_prefix_caching or args.prefix_cache_gib is not None):
        raise ValueError("--enable-prefix-caching and --prefix-cache-gib set up the --compare stacks; for a "
                         "running stack, give them to its `splitserve launch`")
    if not args.compare and args.prefill_chunk_tokens:
        raise ValueError("--prefill-chunk-tokens sets up the --compare stacks; for a running stack, give it to "
                         "its `splitserve launch`")
    if args.compare:
        stacks = compare_spec(args)
        docs, info = compare(stacks, spec, slos)
        extra = dict(comparison=_print_comparisons(docs, spec.rates))
    else:
        target = args.address
        if args.base_url:
            if not args.model:
                raise ValueError("--base-url needs --model: the checkpoint the server serves (a directory or 'demo'), "
                                 "for its vocabulary, EOS ids and context")
            target = openai_target(args.base_url, args.model, args.served_model_name)
        docs, info = sweep(target, spec, slos)
        extra = {}
    if args.result_json:
        write_json(args.result_json, document(docs, config=vars(args), model_info=info, extra=extra))
        print(f"wrote {args.result_json}")
    if args.plot_dir:
        from splitserve.runtime.serving_bench.plots import plot_latency_cdfs, plot_latency_vs_rate

        paths = [plot_latency_cdfs(docs, args.plot_dir), plot_latency_vs_rate(docs, args.plot_dir)]
        print("wrote " + ", ".join(str(p) for p in paths if p is not None))
    return 0 if all(d["metrics"]["completed"] for d in docs) else 1


def _print_comparisons(docs: list[dict], rates: tuple[float, ...]) -> list[dict]:
    """Prints disaggregated vs colocated per rate; returns the tables for the JSON."""
    tables = []
    for i, rate in enumerate(rates):
        base, other = docs[i], docs[len(rates) + i]
        table = comparison_table(base, other)
        print(f"\ncolocated vs disaggregated, request rate {rate:g}:\n{table}")
        tables.append(dict(request_rate=base["request_rate"], table=table))
    return tables
