#!/usr/bin/env python3
"""Compares shoal's engine with Hugging Face `transformers` on the same weights.

Usage: hf_compare.py MODEL_DIR SHOAL_LOGITS.f32 SHOAL_JSON_LINE [--device cuda|cpu]

Loads MODEL_DIR (config.json + safetensors, e.g. from the synth_weights example) with
`LlamaForCausalLM` in float32, runs the same tokens, and prints one JSON line with the
relative error ||shoal - ref|| / ||ref|| of the logits at every position, and how many of
the greedy continuation's tokens agree.
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, logits_file, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    device = "cuda" if "--device" not in sys.argv else sys.argv[sys.argv.index("--device") + 1]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).eval()
    tokens = meta["tokens"]
    vocab = meta["vocab"]
    ours = np.fromfile(logits_file, dtype="<f4").reshape(meta["positions"], vocab)
    with torch.no_grad():
        ids = torch.tensor([tokens], device=device)
        ref = model(ids).logits[0].double().cpu().numpy()
        ref = ref[len(tokens) - meta["positions"]:]
        per_pos = [float(np.linalg.norm(ours[i] - ref[i]) / np.linalg.norm(ref[i])) for i in range(len(ours))]
        out = model.generate(ids, max_new_tokens=len(meta["greedy"]), do_sample=False, min_new_tokens=len(meta["greedy"]))
        theirs = out[0, len(tokens):].tolist()
    agree = 0
    for a, b in zip(meta["greedy"], theirs):
        if a != b:
            break
        agree += 1
    print(json.dumps({
        "rel_err_max": max(per_pos), "rel_err_per_position": per_pos,
        "greedy_agree": agree, "greedy_len": len(meta["greedy"]),
        "shoal_greedy": meta["greedy"], "hf_greedy": theirs,
        "torch": torch.__version__, "device": device, "shoal_backend": meta.get("backend", "cpu"),
    }))


if __name__ == "__main__":
    main()
