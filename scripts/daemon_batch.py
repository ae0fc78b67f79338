#!/usr/bin/env python3
"""Aggregate decode speed of N chat actors on one `shoal serve`, messaged at the same time
(docs/benchmarks.md, "Many actors, one GPU"). Usage:
  daemon_batch.py SHOAL MODEL.gguf BACKEND N[,N...] [MAX_TOKENS]
For each N: a fresh daemon, N chat actors (greedy, MAX_TOKENS each, default 128), one message
each, all at once; the replies are read as they stream (one event loop, a connection per
actor, each line timed when its bytes are read). Prints one JSON line per N: streamed
pieces (about one per token) per second in all, from the first request to the last piece, the
gap between one actor's pieces (p50/p99), and how many answers came back whole.
With IDLE=K in the environment, K more actors are spawned first and each answers one short
message (16 tokens), then stays idle holding its session while the N answer; the line adds
the GPU memory in use before the daemon's actors, after the idle ones and at the end."""
import asyncio, json, os, subprocess, sys, threading, time, urllib.request

shoal, model, backend = sys.argv[1], sys.argv[2], sys.argv[3]
ns = [int(x) for x in sys.argv[4].split(",")]
max_tokens = sys.argv[5] if len(sys.argv) > 5 else "128"
IDLE = int(os.environ.get("IDLE", "0"))
PROMPT = b"Write a long story about a lighthouse keeper and the sea, with many details."

def run(n):
    p = subprocess.Popen([shoal, "serve", "--backend", backend, "--addr", "127.0.0.1:0", "--store", f"/tmp/batch-store-{n}",
                          "--max-connections", str(n + IDLE + 16), "--max-actors", str(n + IDLE + 16), "--openai-pool", "1",
                          "--model", f"smollm2={model}"], stderr=subprocess.PIPE, text=True)
    addr = None
    while addr is None:
        line = p.stderr.readline()
        if not line:
            raise SystemExit("the daemon stopped before listening")
        if "http://" in line:
            addr = line.split("http://")[1].split()[0].rstrip("/")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()

    def call(method, path, body=b""):
        r = urllib.request.Request(f"http://{addr}{path}", data=body, method=method)
        with urllib.request.urlopen(r, timeout=600) as f:
            return f.read()

    def gpu():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            return int(out.split()[0]) << 20
        except Exception:
            return None

    gpu0 = gpu()
    idle = IDLE
    idle_ok = []
    if idle:
        short = ["--temperature", "0", "--max-tokens", "16"]
        idle_ids = [json.loads(call("POST", "/v1/actors", json.dumps({"module": "chat", "args": short}).encode()))["id"]
                    for _ in range(idle)]
        def hello(i):
            body = call("POST", f"/v1/actors/{i}/messages", b"Say hello.").decode()
            if any("done" in json.loads(l) for l in body.splitlines()):
                idle_ok.append(i)
        ts = [threading.Thread(target=hello, args=(i,)) for i in idle_ids]
        for t in ts: t.start()
        for t in ts: t.join()
    gpu1 = gpu()
    args = ["--temperature", "0", "--max-tokens", max_tokens]
    ids = [json.loads(call("POST", "/v1/actors", json.dumps({"module": "chat", "args": args}).encode()))["id"] for _ in range(n)]
    pieces, gaps, whole, last, errors = {}, [], {}, [0.0], []

    async def ask(i):
        # One connection per actor on one event loop: each line is timed when its bytes are
        # read, with no client threads between the socket and the clock.
        host, port = addr.rsplit(":", 1)
        count, t_prev, my = 0, None, []
        try:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(f"POST /v1/actors/{i}/messages HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len(PROMPT)}\r\n"
                    f"Connection: close\r\n\r\n".encode() + PROMPT)
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            chunked = b"chunked" in head.lower()
            if status != "200":
                errors.append(f"HTTP {status} {(await r.read(200)).decode(errors='replace')}")
                w.close()
                return
            buf = b""
            while True:
                if chunked:
                    size = int((await r.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                    if size == 0:
                        break
                    data = await r.readexactly(size + 2)
                    data = data[:-2]
                else:
                    data = await r.read(65536)
                    if not data:
                        break
                now = time.time()
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    m = json.loads(line)
                    if "chunk" in m:
                        count += 1
                        if t_prev is not None:
                            my.append(now - t_prev)
                        t_prev = now
                    if "done" in m:
                        whole[i] = True
                    if "error" in m:
                        errors.append(str(m["error"])[:200])
            w.close()
        except Exception as e:  # a reset connection, a malformed reply: counted, shown
            errors.append(f"{type(e).__name__}: {e}"[:200])
        pieces[i] = count
        gaps.extend(my)
        last[0] = max(last[0], t_prev or 0)

    async def ask_all():
        await asyncio.gather(*(ask(i) for i in ids))

    t0 = time.time()
    asyncio.run(ask_all())
    wall = last[0] - t0
    gpu2 = gpu()
    listed = len(json.loads(call("GET", "/v1/actors"))["actors"])
    p.terminate()
    p.wait(timeout=30)
    gaps.sort()
    pct = lambda q: round(gaps[int((len(gaps) - 1) * q)] * 1e3, 2) if gaps else None
    total = sum(pieces.values())
    print(json.dumps({"bench": "daemon-batch", "backend": backend, "actors": n, "max_tokens": int(max_tokens),
                      "pieces": total, "whole_answers": len(whole), "wall_s": round(wall, 3),
                      "pieces_per_s": round(total / wall, 1), "gap_p50_ms": pct(0.5), "gap_p99_ms": pct(0.99),
                      "errors": sorted(set(errors))[:5], "idle_actors": idle, "idle_answered": len(idle_ok),
                      "actors_listed": listed, "gpu_used": [gpu0, gpu1, gpu2]}), flush=True)

for n in ns:
    run(n)
