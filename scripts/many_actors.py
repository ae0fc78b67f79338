#!/usr/bin/env python3
"""64 chat actors on one `shoal serve`, messaged at the same time (scripts/gpu-engine.sh,
part "actors"). Usage: many_actors.py SHOAL MODEL.gguf N BACKEND. Prints one JSON line:
whether every answer has Paris, the wall time, the daemon's RSS and the GPU memory in use
before and after the actors (one copy of the weights; per-actor memory)."""
import json, subprocess, sys, threading, time, urllib.request

shoal, model, n, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
p = subprocess.Popen([shoal, "serve", "--backend", backend, "--addr", "127.0.0.1:0", "--store", "/tmp/many-store",
                      "--model", f"smollm2={model}"], stderr=subprocess.PIPE, text=True)
addr = p.stderr.readline().split("http://")[1].split()[0]

def call(method, path, body=b""):
    r = urllib.request.Request(f"http://{addr}{path}", data=body, method=method)
    with urllib.request.urlopen(r, timeout=600) as f:
        return f.read()

def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) * 1024
    return 0

def gpu():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0]) << 20
    except Exception:
        return None

rss0, gpu0 = rss(), gpu()
ids = [json.loads(call("POST", "/v1/actors", json.dumps({"module": "chat", "args": ["--temperature", "0", "--max-tokens", "12"]}).encode()))["id"] for _ in range(n)]
answers = {}

def ask(i):
    body = call("POST", f"/v1/actors/{i}/messages", b"What is the capital of France?").decode()
    answers[i] = "".join(json.loads(l).get("chunk", "") for l in body.splitlines())

t0 = time.time()
ts = [threading.Thread(target=ask, args=(i,)) for i in ids]
for t in ts: t.start()
for t in ts: t.join()
wall = time.time() - t0
rss1, gpu1 = rss(), gpu()
actors = json.loads(call("GET", "/v1/actors"))["actors"]
p.kill()
ok = sum("Paris" in a for a in answers.values())
print(json.dumps({"bench": "many-actors", "backend": backend, "actors": n, "answered_paris": ok, "wall_s": round(wall, 3),
                  "rss_before": rss0, "rss_after": rss1, "rss_per_actor": (rss1 - rss0) // n,
                  "gpu_used_before": gpu0, "gpu_used_after": gpu1,
                  "gpu_per_actor": None if gpu0 is None else (gpu1 - gpu0) // n,
                  "linear_memory_per_actor": actors[0]["memory_bytes"] if actors else None,
                  "sample": answers[ids[0]].strip()}))
