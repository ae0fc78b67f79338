#!/usr/bin/env python3
"""The host <-> GPU copy bandwidth that bounds parking and unparking a KV cache: pinned host
memory to the device and back, for 189 MB and 268 MB (SmolLM2's and the 1B shape's 4,096-token
caches), CUDA events, median of 10 after a warm-up. One JSON line per size and direction."""
import json, torch
for n in (189138016, 268235270):
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, f in (("htod", lambda: d.copy_(h, non_blocking=True)), ("dtoh", lambda: h.copy_(d, non_blocking=True))):
        f(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(10):
            s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
        ts.sort(); t = ts[len(ts) // 2]
        print(json.dumps({"bench": "pinned-copy", "direction": name, "bytes": n, "median_s": round(t, 6), "GBps": round(n / t / 1e9, 1)}))
