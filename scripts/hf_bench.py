#!/usr/bin/env python3
"""Prefill and decode speed of Hugging Face `transformers` at batch 1, the reference for
shoal's engine benchmarks (docs/benchmarks.md).

Usage: hf_bench.py MODEL_DIR [--prompt 128] [--gen 128] [--repeat 5] [--dtype bfloat16]
       [--gguf FILE] [--modes eager,compiled]

The prompt is the same fixed pseudo-random ids as shoal's `generate` bench. `eager` is
`model.generate` with the default dynamic cache; `compiled` is `generate` with
`cache_implementation="static"` and `torch.compile` of the forward (transformers'
documented fast path), if it runs here; `compiled-default` the same without CUDA graphs. One `generate` call per repeat; a streamer
timestamps each token, so prefill is the time to the first new token (it includes
sampling that token) and decode the rate of the rest. Prints one JSON line per mode with the medians.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer


class Clock(BaseStreamer):
    """Records when generate hands over each new token (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def ids_for(n, vocab):
    return [((i * 2654435761 + 17) % (vocab - 1)) + 1 for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--modes", default="eager,compiled,compiled-default")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=dtype, **kw).to("cuda").eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([ids_for(a.prompt, vocab)], device="cuda")
    for mode in a.modes.split(","):
        gen_kw = dict(do_sample=False, min_new_tokens=a.gen, max_new_tokens=a.gen, pad_token_id=0)
        try:
            if mode.startswith("compiled"):
                # "compiled": CUDA graphs (reduce-overhead); "compiled-default": without.
                torch._dynamo.reset()
                model.generation_config.cache_implementation = "static"
                cmode = "reduce-overhead" if mode == "compiled" else "default"
                model.forward = torch.compile(model.__class__.forward.__get__(model), mode=cmode, fullgraph=True)
            pre, dec = [], []
            with torch.no_grad():
                for r in range(a.repeat + 2):
                    clock = Clock()
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    model.generate(ids, streamer=clock, **gen_kw)
                    torch.cuda.synchronize()
                    end = time.perf_counter()
                    # times[0]: the prompt handed over; times[1]: the first new token.
                    first = clock.times[1]
                    if r >= 2:  # warm-up (and compilation) first
                        pre.append(a.prompt / (first - t))
                        dec.append((a.gen - 1) / max(end - first, 1e-9))
            print(json.dumps({
                "driver": "transformers-" + mode, "model": a.model_dir, "prompt": a.prompt, "gen": a.gen,
                "dtype": a.dtype, "prefill_tok_s": round(statistics.median(pre), 1),
                "decode_tok_s": round(statistics.median(dec), 1),
                "runs": {"prefill": [round(x, 1) for x in pre], "decode": [round(x, 1) for x in dec]},
                "torch": torch.__version__,
            }), flush=True)
        except Exception as e:  # report and go on: compiled mode may not run everywhere
            print(json.dumps({"driver": "transformers-" + mode, "model": a.model_dir, "error": repr(e)[:500]}), flush=True)


if __name__ == "__main__":
    main()
