#!/usr/bin/env python3
"""Compares two runs of shoal's `logits` example (e.g. the CPU and CUDA backends).

Usage: compare_logits.py REF.f32 REF_JSON_LINE OTHER.f32 OTHER_JSON_LINE

Prints one JSON line: ||other - ref|| / ||ref|| per position (and the largest), and how
many greedy tokens agree from the start.
"""
import json
import sys

import numpy as np


def main():
    ra, ma, rb, mb = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    a = np.fromfile(ra, dtype="<f4").reshape(ma["positions"], ma["vocab"]).astype(np.float64)
    b = np.fromfile(rb, dtype="<f4").reshape(mb["positions"], mb["vocab"]).astype(np.float64)
    n = min(len(a), len(b))
    a, b = a[len(a) - n:], b[len(b) - n:]
    rel = [float(np.linalg.norm(b[i] - a[i]) / np.linalg.norm(a[i])) for i in range(n)]
    agree = 0
    for x, y in zip(ma["greedy"], mb["greedy"]):
        if x != y:
            break
        agree += 1
    print(json.dumps({
        "ref": ma.get("backend"), "other": mb.get("backend"), "rel_err_max": max(rel),
        "rel_err_per_position": rel, "greedy_agree": agree, "greedy_len": min(len(ma["greedy"]), len(mb["greedy"])),
        "ref_greedy": ma["greedy"], "other_greedy": mb["greedy"],
    }))


if __name__ == "__main__":
    main()
