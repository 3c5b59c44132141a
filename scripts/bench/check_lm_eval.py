"""lm-evaluation-harness's own OpenAI client (`local-completions`) against a running
`splitserve openai-server`, checked against transformers on the same checkpoint.

    pip install --no-deps lm_eval && pip install requests tenacity   # lm_eval's API client, without its task deps
    splitserve launch --model demo --openai-port 8123 --served-model-name demo
    python scripts/bench/check_lm_eval.py --url http://127.0.0.1:8123/v1/completions --model demo

`loglikelihood` is how lm-eval scores multiple-choice tasks: batches of token-id prompts with
echo, max_tokens 1 and logprobs 1, summing the continuation's token_logprobs. `generate_until`
sends prompts with stop strings. Each is compared with transformers' log-softmax and greedy
`generate()` on the ids lm-eval sent. Prints one line per request and exits 1 on a mismatch.
Not part of the test suite: lm_eval is not a dependency (tests/test_openai_server.py sends the
same bodies through OpenAI's client).
"""

from __future__ import annotations

import argparse
import sys

PAIRS = [("Once upon a time", " there was a"), ("The sea was", " calm"), ("In the morning", " the sun"),
         ("She said", " hello"), ("Tell me about", " the sea and the sky"),
         ("Once upon a time", " turn week")]  # the greedy continuation of the demo model
PROMPTS = ["Once upon a time", "The sea was", "In the morning"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's /v1/completions URL")
    p.add_argument("--model", default="demo", help="the checkpoint the stack serves (an HF directory, or 'demo')")
    p.add_argument("--served-model-name", default="demo")
    p.add_argument("--batch-size", type=int, default=4, help="requests lm-eval puts in one body")
    args = p.parse_args()

    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from splitserve.models.metadata import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    lm = LocalCompletionsAPI(base_url=args.url, model=args.served_model_name, tokenizer_backend="huggingface",
                             tokenizer=model_dir, tokenized_requests=True, batch_size=args.batch_size,
                             max_length=512, seed=1234)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    failures = 0

    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)])
    for (context, continuation), (score, greedy) in zip(PAIRS, scores):
        ctx_ids, cont_ids = lm._encode_pair(context, continuation)  # lm-eval's own split of the two
        ids = ctx_ids + cont_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
        positions = range(len(ctx_ids), len(ids))
        want = sum(logprobs[t - 1, ids[t]] for t in positions)
        want_greedy = all(logprobs[t - 1].argmax() == ids[t] for t in positions)
        ok = abs(score - want) < 1e-3 and greedy == want_greedy
        failures += not ok
        print(f"loglikelihood {context + continuation!r:40} lm-eval {score:.5f} transformers {want:.5f} "
              f"greedy {greedy}/{want_greedy} {'ok' if ok else 'MISMATCH'}")

    texts = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 8}), i)
                               for i, prompt in enumerate(PROMPTS)])
    for prompt, text in zip(PROMPTS, texts):
        ids = torch.tensor([lm.tok_encode(prompt)])  # the ids lm-eval sent
        out = hf.generate(ids, max_new_tokens=8, do_sample=False)
        want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        failures += text != want
        print(f"generate_until {prompt!r:40} {'ok' if text == want else 'MISMATCH'} {text!r}")
    print("all equal" if not failures else f"{failures} MISMATCHES")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
