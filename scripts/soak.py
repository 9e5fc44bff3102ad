#!/usr/bin/env python3
"""Soak: a bounded load run of the API program (API and eSpeak worker in one process)
on loopback, from closed-loop HTTP clients. Reports requests/s, error rate, p50/p99 per
route and overall, and that every accepted job completed (nothing lost).

Usage (build first: `cargo build --example api --no-default-features`):
    python3 scripts/soak.py [--duration 60] [--clients 8] [--api target/debug/examples/api]
                            [--redis redis://127.0.0.1:6379]

Each client loops: POST /v1/speech?wait=30 with a new sentence (the job is enqueued,
synthesised by the in-process worker and waited for), then GET /v1/jobs/{id} and
GET /v1/jobs/{id}/audio. The API runs under its own key prefix, deleted afterwards.
Standard library only.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def percentile(sorted_ms, p):
    if not sorted_ms:
        return float("nan")
    k = min(len(sorted_ms) - 1, max(0, round(p / 100 * (len(sorted_ms) - 1))))
    return sorted_ms[k]


class Client(threading.Thread):
    def __init__(self, port, index, deadline):
        super().__init__(daemon=True)
        self.port, self.index, self.deadline = port, index, deadline
        self.samples = []  # (route, ok, ms)
        self.jobs = []  # accepted job ids
        self.errors = []

    def call(self, conn, method, path, body=None):
        t0 = time.monotonic()
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, data, (time.monotonic() - t0) * 1000

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            text = f"Soak client {self.index}, request {i}. The quick brown fox jumps over the lazy dog."
            body = json.dumps({"text": text, "voice": "en-us"})
            try:
                status, data, ms = self.call(conn, "POST", "/v1/speech?wait=30", body)
                ok = status == 200 and json.loads(data).get("state") == "completed"
                self.samples.append(("POST /v1/speech?wait=30", ok, ms))
                if status in (200, 202):
                    job = json.loads(data)["id"]
                    self.jobs.append(job)
                else:
                    self.errors.append(f"POST {status} {data[:200]!r}")
                    continue
                if not ok:
                    self.errors.append(f"POST not completed: {data[:200]!r}")
                status, data, ms = self.call(conn, "GET", f"/v1/jobs/{job}")
                self.samples.append(("GET /v1/jobs/{id}", status == 200, ms))
                if status != 200:
                    self.errors.append(f"GET job {status}")
                status, data, ms = self.call(conn, "GET", f"/v1/jobs/{job}/audio")
                good = status == 200 and len(data) > 44 and data[:4] == b"RIFF"
                self.samples.append(("GET /v1/jobs/{id}/audio", good, ms))
                if not good:
                    self.errors.append(f"GET audio {status} {len(data)} bytes")
            except Exception as e:  # a dropped connection counts as an error
                self.samples.append(("(connection)", False, 0.0))
                self.errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (default 8)")
    ap.add_argument("--api", default="target/debug/examples/api", help="the built API program")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379")
    ap.add_argument("--voices", default=None,
                    help="VOXQUEUE_VOICES for the API (default: an empty dir, so eSpeak NG only; "
                         "a Piper voice needs a build with the candle feature)")
    args = ap.parse_args()

    port = free_port()
    prefix = f"soak-{uuid.uuid4().hex[:12]}"
    log = tempfile.NamedTemporaryFile(prefix="soak-api-", suffix=".log", delete=False)
    voices = args.voices or tempfile.mkdtemp(prefix="soak-no-voices-")
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"), VOXQUEUE_VOICES=voices)
    api = subprocess.Popen(
        [args.api, "--with-worker", "--listen", f"127.0.0.1:{port}", "--redis", args.redis, "--prefix", prefix],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/voices")
                r = c.getresponse()
                body = r.read()
                if r.status == 200 and b"en-us" in body:
                    break
            except OSError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the API did not come up (log: {log.name})")
            time.sleep(0.1)

        start = time.monotonic()
        clients = [Client(port, i, start + args.duration) for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.monotonic() - start

        # Nothing lost: every accepted job is completed (give stragglers 60 s).
        jobs = [j for c in clients for j in c.jobs]
        pending = set(jobs)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        until = time.monotonic() + 60
        while pending and time.monotonic() < until:
            for job in list(pending):
                conn.request("GET", f"/v1/jobs/{job}")
                r = conn.getresponse()
                data = r.read()
                if r.status == 200 and json.loads(data).get("state") == "completed":
                    pending.discard(job)
            if pending:
                time.sleep(0.5)

        samples = [s for c in clients for s in c.samples]
        errors = [e for c in clients for e in c.errors]
        total = len(samples)
        failed = sum(1 for s in samples if not s[1])
        print(f"soak: {args.clients} clients for {wall:.1f} s against {args.api} --with-worker (prefix {prefix})")
        print(f"requests: {total}, {total / wall:.1f}/s; errors: {failed} ({100 * failed / max(total, 1):.2f} %)")
        routes = sorted({s[0] for s in samples})
        print("| route | requests | errors | p50 | p99 |")
        print("| --- | --- | --- | --- | --- |")
        for route in routes + ["all"]:
            ms = sorted(s[2] for s in samples if route == "all" or s[0] == route)
            errs = sum(1 for s in samples if (route == "all" or s[0] == route) and not s[1])
            print(f"| {route} | {len(ms)} | {errs} | {percentile(ms, 50):.1f} ms | {percentile(ms, 99):.1f} ms |")
        print(f"jobs accepted: {len(jobs)}, completed: {len(jobs) - len(pending)}, lost: {len(pending)}")
        for e in errors[:10]:
            print("  error:", e)
        ok = not pending and failed == 0
    finally:
        api.send_signal(signal.SIGINT)
        try:
            api.wait(timeout=15)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()
        host_port = args.redis.split("://", 1)[1].split("/", 1)[0]
        host, _, rport = host_port.rpartition(":")
        keys = subprocess.run(["redis-cli", "-h", host or "127.0.0.1", "-p", rport or "6379", "--scan",
                               "--pattern", f"{prefix}:*"], capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-h", host or "127.0.0.1", "-p", rport or "6379", "DEL", *keys[i:i + 500]],
                           capture_output=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
