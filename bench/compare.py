#!/usr/bin/env python3
"""Runs the standard scenarios side by side and writes BENCHMARKS.md.

    python3 bench/compare.py [--quick] [--out BENCHMARKS.md]

Scenarios (issue 4), every server pinned to CPU 0 and the generator
(`furrow bench`) to CPU 1, loopback only, a fresh server per run:

  a. 100 devices flat out, 120-byte JSON: Furrow on SQLite at
     synchronous=full, Furrow with durability lowered (synchronous=off,
     labelled as such), Mosquitto at QoS 1 with persistence off. The three
     alternate round by round, so that the machine's drift hits all alike.
  b. idle connections at 1k, 10k and 19k (one generator process each):
     server RSS growth per connection, Furrow (sessions parked, the
     default; and with parking off) against Mosquitto.
  f. a quiet fleet: 10,000 devices sending one message every 5 s, so that
     every message wakes a parked session: CPU per message and ACK latency,
     Furrow parked, Furrow with parking off, Mosquitto.
  c. storm: 10,000 devices reconnecting at once.
  d. growth: the same total rate (50,000 msgs/s) over 100, 1,000 and 10,000
     connections: rate, latency, and server CPU per message.
  e. latency below saturation: steady at half of (a)'s Furrow rate.

Needs: cargo, taskset, mosquitto (Debian's package). Takes about 5 minutes
(--quick: about 2, shorter runs and one round).
"""
import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GATEWAY_BIN measures another build (gateway and generator alike), to set
# two builds side by side with the same sections.
FURROW = os.environ.get("GATEWAY_BIN") or os.path.join(ROOT, "target", "release", "furrow")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, what):
    for _ in range(100):
        if proc.poll() is not None:
            sys.exit(f"{what} exited at start (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on port {port}")


class Server:
    """A server on CPU 0: a Furrow gateway or a Mosquitto broker."""

    def __init__(self, kind, sync="full", env=None, tls=None):
        """`tls`: a directory from `furrow certs` (ca.pem, server.pem,
        server.key): the devices connect over TLS."""
        self.kind = kind
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="furrow-bench-")
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        log = open(os.path.join(self.dir, "server.log"), "w")
        if kind == "furrow":
            env = dict(os.environ, RUST_LOG="warn", FURROW_STORAGE__SYNCHRONOUS=sync,
                       FURROW_API__LISTEN="127.0.0.1:0", **(env or {}))
            cmd = [FURROW, "serve", "--data-dir", self.dir, "--listen", self.addr]
            if tls:
                tls_port = free_port()
                env.update(FURROW_TLS__CERT_FILE=os.path.join(tls, "server.pem"),
                           FURROW_TLS__KEY_FILE=os.path.join(tls, "server.key"),
                           FURROW_TLS__LISTEN=f"127.0.0.1:{tls_port}")
                self.device_addr = f"127.0.0.1:{tls_port}"
        else:
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest stdout\n")
                if tls:
                    f.write(f"cafile {os.path.join(tls, 'ca.pem')}\n"
                            f"certfile {os.path.join(tls, 'server.pem')}\n"
                            f"keyfile {os.path.join(tls, 'server.key')}\n")
            env = dict(os.environ)
            cmd = [mosquitto(), "-c", conf]
        if not tls or kind != "furrow":
            self.device_addr = self.addr
        self.proc = subprocess.Popen(["taskset", "-c", "0"] + cmd, env=env,
                                     stdout=log, stderr=log)
        wait_listening(self.port, self.proc, kind)

    def stop(self):
        self.proc.send_signal(2)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def mosquitto():
    for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto"):
        if os.path.exists(p):
            return p
    sys.exit("mosquitto is not installed: apt-get install mosquitto")


def bench(server, mode, *args):
    """Runs `furrow bench` on CPU 1 against `server`; returns its report."""
    out = os.path.join(server.dir, f"report-{random.getrandbits(32)}.json")
    cmd = ["taskset", "-c", "1", FURROW, "bench", mode, "--addr", server.device_addr,
           "--server-pid", str(server.proc.pid), "--json", out, "--quiet"]
    if server.tls:
        cmd += ["--tls", "--tls-ca", os.path.join(server.tls, "ca.pem")]
    if server.kind == "furrow":
        cmd += ["--data-dir", server.dir, "--prefix", f"b{random.getrandbits(32)}-"]
    else:
        cmd += ["--protocol", "mqtt"]
    cmd += [str(a) for a in args]
    print("  $ furrow bench " + " ".join(cmd[cmd.index("bench") + 1:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"furrow bench failed:\n{r.stderr}\n{r.stdout}")
    with open(out) as f:
        return json.load(f)


def one(kind, mode, *args, sync="full", env=None, tls=None):
    s = Server(kind, sync, env, tls)
    try:
        return bench(s, mode, *args)
    finally:
        s.stop()


def ms(us):
    return f"{us / 1000:.1f} ms"


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mq = subprocess.run([mosquitto(), "-h"], capture_output=True, text=True).stdout.splitlines()
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, Linux {platform.release()}; "
            f"{mq[0] if mq else 'mosquitto'}; "
            f"furrow {subprocess.run([FURROW, '--version'], capture_output=True, text=True).stdout.strip()}, "
            f"git {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--only", action="append", metavar="SECTION",
                    help="run only these sections (flat, idle, storm, growth, quiet; repeatable); "
                         "the others are kept from the existing file")
    opts = ap.parse_args()

    def want(section):
        return not opts.only or section in opts.only
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "furrow"], cwd=ROOT, check=True)
    secs, rounds = (4, 1) if opts.quick else (8, 3)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = []

    if want("flat"):
        # a. flat out, 100 devices.
        print("a. 100 devices flat out", flush=True)
        systems = [("Furrow, SQLite synchronous=full (durable)", "furrow", "full"),
                   ("Furrow, SQLite synchronous=off (NOT durable: comparison only)", "furrow", "off"),
                   ("Mosquitto QoS 1, persistence off (not durable)", "mosquitto", None)]
        runs = {label: [] for label, _, _ in systems}
        for _ in range(rounds):
            for label, kind, sync in systems:
                runs[label].append(one(kind, "flat", "--devices", 100, "--window", 64,
                                       "--warmup", 2, "--duration", secs, sync=sync or "full"))
        med = {}
        md.append("## a. 100 devices, flat out, 120-byte JSON\n")
        md.append(f"Each device keeps 64 messages unacknowledged. {rounds} round(s) of {secs} s, "
                  "the systems alternating; the median round is shown, with every round's rate.\n")
        md.append("| system | acked msgs/s (median) | all rounds | ACK p50 | p99 | server CPU per msg |")
        md.append("|---|---|---|---|---|---|")
        for label, _, _ in systems:
            rs = sorted(runs[label], key=lambda r: r["msgs_per_s"])
            m = rs[len(rs) // 2]
            med[label] = m
            cpu = m.get("server_cpu_us_per_msg")
            rates = ", ".join(f"{r['msgs_per_s']:,.0f}" for r in runs[label])
            cpu_s = f"{cpu:.2f} us" if cpu else "n/a"
            md.append(f"| {label} | {m['msgs_per_s']:,.0f} | {rates} | "
                      f"{ms(m['ack_us']['p50'])} | {ms(m['ack_us']['p99'])} | {cpu_s} |")
        furrow_rate = med[systems[0][0]]["msgs_per_s"]
        mq_rate = med[systems[2][0]]["msgs_per_s"]
        md.append("")
        md.append(f"Durable Furrow against Mosquitto QoS 1: **{furrow_rate / mq_rate:.2f}x** "
                  f"(goal: at least 1.5x, and at least 150,000 durable msgs/s: "
                  f"{'met' if furrow_rate >= 150_000 else 'NOT met'}).\n")

        # e. latency below saturation, at half the durable maximum.
        print("e. steady at half the maximum", flush=True)
        half = furrow_rate / 2
        rate = max(1, round(half / 100))
        st = one("furrow", "steady", "--devices", 100, "--rate", rate, "--window", 256,
                 "--warmup", 2, "--duration", secs)
        md.append("## e. ACK latency below saturation\n")
        md.append(f"100 devices at {rate} msgs/s each ({rate * 100:,} msgs/s offered, half of (a)'s "
                  f"durable rate), `synchronous=full`.\n")
        md.append("| acked msgs/s | p50 | p90 | p99 | p99.9 | max |")
        md.append("|---|---|---|---|---|---|")
        a = st["ack_us"]
        md.append(f"| {st['msgs_per_s']:,.0f} | {ms(a['p50'])} | {ms(a['p90'])} | {ms(a['p99'])} | "
                  f"{ms(a['p999'])} | {ms(a['max'])} |")
        md.append(f"\nGoal: p99 at most 5 ms: **{'met' if a['p99'] <= 5000 else 'NOT met'}**.\n")

    if want("idle"):
        # b. idle memory. Held 4 s: quiet sessions park 5 ms after their last frame.
        print("b. idle connections", flush=True)
        md.append("## b. Memory per idle connection\n")
        md.append("Server RSS growth while N authenticated connections are held for 4 s, divided "
                  "by N (kernel socket memory not included, the same for all). Furrow parks a "
                  "session quiet for `sessions.park_after_ms` (5 ms; 2 s for a device sending more often than every 2 s): "
                  "no task, no buffer, and once the connection burst is over it gives the heap pages the "
                  "burst's handshakes and tasks freed back to the system (`sessions.trim_after`) "
                  "(docs/performance.md); the parking-off column is the same build with "
                  "`park_after_ms = 0`.\n")
        md.append("The anonymous columns count the heap alone (`RssAnon`); the rest of the "
                  "growth is file-backed pages, mostly each server's own code faulted in on "
                  "first use, shared with the page cache and paid once, not per connection "
                  "(a larger share of the total at 1,000 connections).\n")
        header = ("| connections | Furrow bytes/conn | Furrow, parking off | Mosquitto bytes/conn "
                  "| Furrow / Mosquitto | Furrow anonymous | Mosquitto anonymous |")
        separator = "|---" * (header.count("|") - 1) + "|"
        md.append(header)
        md.append(separator)
        def idle_row(n, tls=None, extra=(), label=""):
            """Furrow parked, Furrow with parking off, Mosquitto: one row."""
            f = one("furrow", "idle", "--devices", n, "--duration", 4, *extra, tls=tls)
            off = one("furrow", "idle", "--devices", n, "--duration", 4, *extra, tls=tls,
                      env={"FURROW_SESSIONS__PARK_AFTER_MS": "0"})
            m = one("mosquitto", "idle", "--devices", n, "--duration", 4, *extra, tls=tls)
            fb, ob, mb = (r["memory"]["bytes_per_connection"] for r in (f, off, m))
            fa, ma = (r["memory"].get("anon_bytes_per_connection") for r in (f, m))
            anon = lambda v: "-" if v is None else f"{v:,.0f}"
            return (f"| {n:,}{label} | {fb:,.0f} | {ob:,.0f} | {mb:,.0f} | {fb / mb:.2f}x "
                    f"| {anon(fa)} | {anon(ma)} |")

        for n in ([1000, 10000] if opts.quick else [1000, 10000, 19000]):
            md.append(idle_row(n))
        md.append("\nGoal: no higher than Mosquitto's (issue 14: below 700 bytes).\n")

        # The same over TLS (ECDSA P-256 from `furrow certs`), 5,000.
        certs = tempfile.mkdtemp(prefix="furrow-certs-")
        subprocess.run([FURROW, "certs", "ca", "--out", certs], check=True, capture_output=True)
        subprocess.run([FURROW, "certs", "server", "--name", "localhost", "--out", certs],
                       check=True, capture_output=True)
        # Mosquitto started as root reads its files as user mosquitto:
        # these throwaway test certificates are made readable.
        os.chmod(certs, 0o755)
        for name in os.listdir(certs):
            os.chmod(os.path.join(certs, name), 0o644)
        n = 2000 if opts.quick else 5000
        rows = [idle_row(n, tls=certs, label=", TLS 1.3"),
                # As devices on mbedTLS 2.x connect (this project's C library).
                idle_row(n, tls=certs, extra=("--tls12",), label=", TLS 1.2")]
        shutil.rmtree(certs, ignore_errors=True)
        md.append("Over TLS (rustls for the handshake and, since 8861a7f, Furrow's own record layer "
                  "after it; OpenSSL for Mosquitto; ECDSA P-256 from `furrow certs`; TLS 1.2 keeps "
                  "a server-side session cache entry per device for resumption, TLS 1.3 resumes "
                  "from tickets):\n")
        md.append(header.replace("| connections", "| TLS connections"))
        md.append(separator)
        md.extend(rows)
        md.append("\nGoal (issue 14): at most 3,000 bytes per TLS connection.\n")

    if want("quiet"):
        # f. a quiet fleet: every message wakes a parked session.
        print("f. quiet fleet", flush=True)
        md.append("## f. A quiet fleet\n")
        md.append("10,000 devices, one message every 5 s each (2,000 msgs/s), `synchronous=full`: "
                  "each Furrow session parks between its messages (again as soon as its message "
                  "is ACKed: 5 s apart is not chatty), so every message "
                  "wakes one.\n")
        md.append("| system | acked msgs/s | ACK p50 | p99 | server CPU per msg |")
        md.append("|---|---|---|---|---|")
        for label, kind, env in [("Furrow (parks)", "furrow", None),
                                 ("Furrow, parking off", "furrow",
                                  {"FURROW_SESSIONS__PARK_AFTER_MS": "0"}),
                                 ("Mosquitto QoS 1", "mosquitto", None)]:
            r = one(kind, "steady", "--devices", 10000, "--rate", 0.2, "--window", 256,
                    "--warmup", 6, "--duration", 20 if not opts.quick else 10, env=env)
            cpu = r.get("server_cpu_us_per_msg")
            md.append(f"| {label} | {r['msgs_per_s']:,.0f} | {ms(r['ack_us']['p50'])} | "
                      f"{ms(r['ack_us']['p99'])} | {f'{cpu:.1f} us' if cpu else 'n/a'} |")
        md.append("")

    if want("storm"):
        # c. storm.
        print("c. storm", flush=True)
        s = one("furrow", "storm", "--devices", 10000, "--rate", 1, "--warmup", 3, "--duration", 30)
        st = s["storm"]
        md.append("## c. Reconnect storm\n")
        md.append("10,000 devices stream at 1 msg/s, then all drop their connections at once and "
                  "reconnect; a device is back at its first ACK after reconnecting.\n")
        md.append("| devices | back | all back in | per device p50 | p99 |")
        md.append("|---|---|---|---|---|")
        allb = f"{st['all_back_ms']:,.0f} ms" if st["all_back_ms"] is not None else "NOT all back"
        md.append(f"| {st['devices']:,} | {st['back']:,} | {allb} | {ms(st['back_us']['p50'])} | "
                  f"{ms(st['back_us']['p99'])} |")
        md.append("\nGoal: all back within 3 s.\n")

    # d. growth.
    if want("growth"):
        print("d. growth", flush=True)
        total = 50_000
        md.append("## d. Growth: cost per message as connections grow\n")
        md.append(f"The same {total:,} msgs/s offered in total, spread over more and more "
                  "connections (steady mode, window 256), then 10,000 quiet devices at 1 msg/s. "
                  "Furrow on SQLite `synchronous=full` and Mosquitto QoS 1 (persistence off) "
                  "alternate row by row. The cost per message should stay flat, and ACK p99 "
                  "within 5 ms. Furrow's CPU is also split by thread: its storage threads "
                  "(`furrow-db-*`: SQLite, the WAL, fsync) do work Mosquitto without "
                  "persistence does not do at all, so the last column compares the rest "
                  "(the network path: sockets, sessions, ACKs).\n")
        md.append("| devices x msgs/s | Furrow acked/s | ACK p50 | p99 | CPU/msg | "
                  "Mosquitto acked/s | p50 | p99 | CPU/msg | Furrow/Mosquitto CPU | "
                  "of Furrow's: storage threads | Furrow without storage / Mosquitto |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n, rate in ((100, total / 100), (1000, total / 1000), (10000, total / 10000),
                        (10000, 1)):
            row = {}
            for kind in ("furrow", "mosquitto"):
                row[kind] = one(kind, "steady", "--devices", n, "--rate", rate, "--window", 256,
                                "--warmup", 3, "--duration", secs)
            f, m = row["furrow"], row["mosquitto"]
            fc, mc = f.get("server_cpu_us_per_msg"), m.get("server_cpu_us_per_msg")
            ratio = f"{fc / mc:.2f}" if fc and mc else "n/a"
            cpu = lambda v: f"{v:.2f} us" if v else "n/a"
            threads = f.get("server_threads_cpu_s") or {}
            db = sum(v for k, v in threads.items() if k.startswith("furrow-db"))
            fs = db * 1e6 / f["acked"] if threads and f["acked"] else None
            net = f"{(fc - fs) / mc:.2f}" if fc and mc and fs is not None else "n/a"
            md.append(f"| {n:,} x {rate:g} | {f['msgs_per_s']:,.0f} | {ms(f['ack_us']['p50'])} | "
                      f"{ms(f['ack_us']['p99'])} | {cpu(fc)} | {m['msgs_per_s']:,.0f} | "
                      f"{ms(m['ack_us']['p50'])} | {ms(m['ack_us']['p99'])} | {cpu(mc)} | "
                      f"{ratio} | {cpu(fs)} | {net} |")
        md.append("")

    head = ["# Benchmarks\n",
            f"Written by `python3 bench/compare.py{' --quick' if opts.quick else ''}` on {started}.",
            f"Machine: {machine()}.\n",
            "Servers pinned to CPU 0, the load generator (`furrow bench`) to CPU 1, loopback "
            "only. The machine is shared and noisy: compare the ratios within this file, not "
            "absolute figures across runs. Every command is printed by the script as it runs; "
            "`furrow bench --help` documents the options.\n"]
    # Sections measured by other scripts (PostgreSQL) follow KEEP: kept.
    kept = ""
    if os.path.exists(opts.out):
        with open(opts.out) as f:
            old = f.read()
        if KEEP in old:
            kept = "\n" + old[old.index(KEEP):]
    if opts.only and os.path.exists(opts.out):
        # Sections not run this time stay as they were.
        fresh = split_sections("\n".join(md))
        with open(opts.out) as f:
            old_text = f.read()
        if KEEP in old_text:
            old_text = old_text[:old_text.index(KEEP)]
        merged = []
        for key, text in split_sections(old_text):
            new_text = dict(fresh).get(key)
            merged.append(new_text if new_text is not None else text)
        known = {k for k, _ in split_sections(old_text)}
        merged += [t for k, t in fresh if k not in known]
        md = ["\n".join(merged)]
        head[1] = (f"Written by `python3 bench/compare.py`: the {', '.join(opts.only)} "
                   f"section(s) re-run with `--only` on {started}, the others kept from the "
                   "previous full run.")
    with open(opts.out, "w") as f:
        f.write("\n".join(head + md) + "\n" + kept)
    print(f"wrote {opts.out}")


KEEP = "<!-- kept by compare.py: measured by other scripts -->"


def split_sections(text):
    """(key, text) for each "## x." section of a BENCHMARKS.md body."""
    out = []
    for part in re.split(r"(?m)^(?=## )", text):
        m = re.match(r"## (\w)\.", part)
        if m:
            out.append((m.group(1), part.rstrip("\n") + "\n"))
    return out


if __name__ == "__main__":
    main()
