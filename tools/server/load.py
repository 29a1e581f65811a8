#!/usr/bin/env python3
"""A bounded load test of the server example on the tiny fixture model.

It starts `target/release/examples/server` on a free loopback port (with a queue large enough
for every client), then runs N client threads for T seconds, each sending
POST /sdapi/v1/txt2img in a loop over one keep-alive connection, with a seed unique to every
request (client_id * 1_000_000 + k) and a prompt naming both. Requests started before the
deadline are waited for; nothing is sent after it.

Every answer must be 200 with exactly one PNG of the size asked for, and its info must carry
the seed (and prompt) that was sent: a request with no such answer is lost, an answer
carrying another request's seed is mismatched, a seed answered twice is duplicated. At the end
the count of answers is compared with GET /health's `served` counter, and the server is
stopped with SIGTERM and must exit 0. The server's resident memory (VmRSS from
/proc/PID/status) is sampled every 0.5 s.

Standard library only. Exit status 1 on any lost, duplicated or mismatched request, a
`served` count that differs, or a server that does not exit 0.

  python3 tools/server/load.py [--clients 4] [--duration 20] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import sys
import threading
import time

from serverproc import DEFAULT_BINARY, DEFAULT_MODEL, Server, b64_png_size


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Outcome:
    __slots__ = ("client", "seed", "start", "end", "status", "problem", "answered_seed")

    def __init__(self, client, seed, start):
        self.client = client
        self.seed = seed
        self.start = start
        self.end = None
        self.status = None
        self.problem = None  # None when the answer checked out
        self.answered_seed = None


def client_loop(cid: int, port: int, args, deadline: float, out: list, api_key: str | None):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
    k = 0
    while time.monotonic() < deadline:
        seed = cid * 1_000_000 + k
        prompt = f"load test client {cid} request {k}"
        body = json.dumps({
            "prompt": prompt,
            "seed": seed,
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
        })
        o = Outcome(cid, seed, time.monotonic())
        try:
            conn.request("POST", "/sdapi/v1/txt2img", body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            o.end = time.monotonic()
            o.status = resp.status
            o.problem = check_answer(o, raw, prompt, args.size)
        except (OSError, http.client.HTTPException) as e:
            o.end = time.monotonic()
            o.problem = f"transport: {type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        out.append(o)
        k += 1
    conn.close()


def check_answer(o: Outcome, raw: bytes, prompt: str, size: int) -> str | None:
    if o.status != 200:
        return f"status {o.status}: {raw[:200]!r}"
    try:
        answer = json.loads(raw)
        info = json.loads(answer["info"])
        images = answer["images"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable answer ({type(e).__name__}: {e}): {raw[:200]!r}"
    o.answered_seed = info.get("seed")
    if o.answered_seed != o.seed or info.get("all_seeds") != [o.seed]:
        return f"mismatch: sent seed {o.seed}, info seed {info.get('seed')!r} all_seeds {info.get('all_seeds')!r}"
    if info.get("prompt") != prompt:
        return f"mismatch: sent prompt {prompt!r}, info prompt {info.get('prompt')!r}"
    if not isinstance(images, list) or len(images) != 1:
        return f"{len(images) if isinstance(images, list) else type(images).__name__} images, expected 1"
    try:
        w, h = b64_png_size(images[0])
    except ValueError as e:
        return f"the image is not a base64 PNG: {e}"
    if (w, h) != (size, size):
        return f"image {w}x{h}, expected {size}x{size}"
    return None


class RssSampler(threading.Thread):
    """VmRSS of the server every `interval` seconds, with the time since `t0`."""

    def __init__(self, server: Server, interval: float, t0: float):
        super().__init__(daemon=True)
        self.server, self.interval, self.t0 = server, interval, t0
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self):
        next_at = time.monotonic()
        while not self.halt.is_set():
            rss = self.server.rss_kib()
            if rss is not None:
                self.samples.append((time.monotonic() - self.t0, rss))
            next_at += self.interval
            self.halt.wait(max(0.0, next_at - time.monotonic()))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args) -> tuple[dict, bool]:
    extra = ["--queue", str(args.queue)]
    with Server(args.binary, args.model, extra_args=extra, api_key=args.api_key) as server:
        before = server.health()
        rss_start = server.rss_kib()
        cpu_start = cpu_seconds(server.pid)
        outcomes: list[Outcome] = []
        t0 = time.monotonic()
        sampler = RssSampler(server, args.rss_interval, t0)
        sampler.start()
        deadline = t0 + args.duration
        threads = [
            threading.Thread(target=client_loop, name=f"client-{c}",
                             args=(c, server.port, args, deadline, outcomes, args.api_key))
            for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_end = time.monotonic()
        sampler.halt.set()
        sampler.join()
        rss_end = server.rss_kib()
        cpu_end = cpu_seconds(server.pid)
        after = server.health()
        exit_code = server.stop(timeout=args.stop_timeout)
        log_tail = server.log_tail(10)

    ok = [o for o in outcomes if o.problem is None]
    failed = [o for o in outcomes if o.problem is not None]
    mismatched = [o for o in failed if o.problem.startswith("mismatch")]
    # A seed answered more than once (each seed is sent once).
    seen: dict[int, int] = {}
    for o in ok:
        seen[o.answered_seed] = seen.get(o.answered_seed, 0) + 1
    duplicated = sorted(s for s, n in seen.items() if n > 1)
    sent_seeds = {o.seed for o in outcomes}
    lost = [o for o in failed if o not in mismatched]
    served = after["served"] - before["served"]

    latencies = sorted((o.end - o.start) * 1000 for o in ok)
    wall = (max((o.end for o in outcomes), default=t_end) - t0) if outcomes else 0.0
    samples = sampler.samples
    after_2s = next((rss for t, rss in samples if t >= 2.0), None)
    rss_max = max([rss for _, rss in samples] + [v for v in (rss_start, rss_end) if v is not None])
    flat = (after_2s is not None and rss_end is not None
            and abs(rss_end - after_2s) <= 0.10 * after_2s)

    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "config": {
            "clients": args.clients, "duration_s": args.duration, "steps": args.steps,
            "size": f"{args.size}x{args.size}", "queue": args.queue,
            "binary": args.binary, "model": args.model,
        },
        "requests": {
            "sent": len(outcomes),
            "answered_ok": len(ok),
            "lost": len(lost),
            "mismatched": len(mismatched),
            "duplicated": len(duplicated),
            "unique_seeds_sent": len(sent_seeds),
            "server_served": served,
            "server_failed": after["failed"] - before["failed"],
            "server_cancelled": after["cancelled"] - before["cancelled"],
            "served_matches": served == len(ok),
            "problems": [f"client {o.client} seed {o.seed}: {o.problem}" for o in failed[:10]],
        },
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "latency_ms": {
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99), "max": latencies[-1] if latencies else float("nan"),
            "mean": sum(latencies) / len(latencies) if latencies else float("nan"),
        },
        "server_cpu_s": (cpu_end - cpu_start) if cpu_start is not None and cpu_end is not None else None,
        "rss_kib": {
            "start": rss_start, "after_2s": after_2s, "max": rss_max, "end": rss_end,
            "samples": len(samples), "flat": flat,
        },
        "server_exit": exit_code,
    }
    good = (not failed and not duplicated and len(sent_seeds) == len(outcomes)
            and served == len(ok) and exit_code == 0)
    if not good:
        print(log_tail, file=sys.stderr)
    return report, good


def mib(kib) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def markdown(r: dict) -> str:
    q, lat, rss, c = r["requests"], r["latency_ms"], r["rss_kib"], r["config"]
    cpu = r["server_cpu_s"]
    rows = [
        ("machine", f"{r['machine']['cpu']}, {r['machine']['cores']} cores"),
        ("load", f"{c['clients']} clients x {c['duration_s']:g} s, txt2img {c['size']}, "
                 f"{c['steps']} steps, 1 image, queue {c['queue']}"),
        ("requests answered (200, checked)", f"{q['answered_ok']} of {q['sent']} sent"),
        ("lost / mismatched / duplicated", f"{q['lost']} / {q['mismatched']} / {q['duplicated']}"),
        ("server `served` counter", f"{q['server_served']} "
         f"({'matches' if q['served_matches'] else 'DIFFERS'}; failed {q['server_failed']}, "
         f"cancelled {q['server_cancelled']})"),
        ("throughput", f"{r['throughput_rps']:.1f} requests/s over {r['wall_s']:.1f} s"),
        ("latency p50 / p90 / p99 / max", " / ".join(f"{lat[k]:.1f}" for k in ("p50", "p90", "p99", "max")) + " ms"),
        ("server CPU", "n/a" if cpu is None else f"{cpu:.1f} s ({cpu / r['wall_s']:.2f} cores)" if r["wall_s"] else f"{cpu:.1f} s"),
        ("RSS start / after 2 s / max / end", " / ".join(mib(rss[k]) for k in ("start", "after_2s", "max", "end"))),
        ("RSS flat (end within 10% of after 2 s)", "yes" if rss["flat"] else "NO"),
        ("server exit on SIGTERM", str(r["server_exit"])),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if q["problems"]:
        lines += ["", "Problems (first 10):"] + [f"- {p}" for p in q["problems"]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=DEFAULT_BINARY, help="the server example binary")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model folder")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of sending")
    p.add_argument("--steps", type=int, default=2, help="steps per request")
    p.add_argument("--size", type=int, default=64, help="width and height")
    p.add_argument("--queue", type=int, default=64, help="the server's --queue")
    p.add_argument("--api-key", default=None, help="start the server with this --api-key and send it")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--rss-interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds to wait for the exit")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH (alone, without PATH: to standard "
                        "output instead of the Markdown table)")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be at least 1 and --duration positive")
    if args.queue < args.clients:
        p.error("--queue must be at least --clients (a full queue answers 503)")

    report, good = run(args)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
