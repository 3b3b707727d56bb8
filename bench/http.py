"""HTTP debit throughput and latency, measured as a ratio against the in-process rate in one run.

It runs real servers as an operator runs them: `tally migrate`, `tally platforms create bench
--scopes read,spend,grant` (the key is its last line), then `tally serve --workers N` on a free
port. SQLite: 1 process, as `make run` has it. PostgreSQL: docs/operations.md's production setup
(`TALLY_ENV=production TALLY_WORKER=off`, one process per core: `--workers 2` on this 2-core
machine, the command the targets are judged on), and beside it 1 process and two per core. Each
server gets a fresh database or schema, dropped after, and is stopped however the run ends. Just
before each server, bench/ledger.py's Tally path runs in-process on the same kind of database
(the `debit` use case, 8 threads sharing one group commit, the same 1,000 accounts): that rate
is the denominator. Through the API it grants the 1,000 accounts a large lot, vacuums, then
sends `POST /v1/accounts/{id}/debits {"amount": 1}`, each with a fresh `Idempotency-Key`, to
random accounts over keep-alive connections: 1 client, 32 clients (each sends again as soon as
it has its answer), and 32 clients paced to half the 32-client rate, each after a warm-up.

    .venv/bin/python bench/http.py [--seconds 5] [--only sqlite|postgresql] [--client raw|httpx]

Reading it: `HTTP / in-process` is the HTTP rate over the in-process rate on the same kind of
database in the same run; machines are noisy, so compare ratios, and check the first line for
other processes' load. p50/p99 are client-side latencies, send to full answer. With clients that
send again at once, latency follows throughput (mean = clients / rate, Little's law): 32 clients
under 50 ms at p99 need well over 640 debits/s. The paced run, whose latencies count from the
scheduled send time, is the latency at a load the server can keep up with. On the progress
lines, `cpu/req` is CPU time per debit: `client` of this process, `server` of the `tally serve`
processes, `machine` of all cores (PostgreSQL and anything else running included); when
`machine` x rate nears the core count, the run is CPU bound. CPU per debit is steadier than
rates on a shared machine: in-process `this process` against HTTP `server` is the cost of
the HTTP layer.

The load generator is one asyncio loop with raw keep-alive HTTP/1.1 connections (asyncio
streams, one request in flight each, Content-Length bodies only: what uvicorn sends). Measured
against the same server on this 2-core machine, it costs 0.13-0.3 ms of CPU per request; 32
http.client connections in threads cost 0.3-0.5 ms; httpx.AsyncClient (httpx 0.28, httpcore
1.0.9, anyio 4.16) costs 2.3-3.4 ms at 1 client and 5-10 ms at 32, more than the server it
measures (httpcore retries `import sniffio` on every request, and its anyio stream and pool
layers add the rest). `--client httpx` runs it for comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a script: bench/http.py would shadow the standard library's http
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import http.client
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass

import httpx
from bench.ledger import (
    POSTGRES_URL,
    postgres_database,
    rate,
    seed,
    settle,
    sqlite_database,
    tally_workers,
    verdict,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tally.adapters.db.engine import Database, connect

ACCOUNTS = 1_000
#: docs/operations.md's production environment: no worker jobs in the API processes (one
#: `tally worker` runs them; the sweep has nothing to do here, so it is left out). Production
#: starts only with a real processor and an SMTP server: neither is reached by this bench.
PRODUCTION_SETTINGS = {
    "TALLY_ENV": "production",
    "TALLY_WORKER": "off",
    "TALLY_SECRET_KEY": secrets.token_urlsafe(32),
    "TALLY_PAYMENTS": "gumroad",
    "TALLY_GUMROAD_WEBHOOK_TOKEN": secrets.token_urlsafe(16),
    "TALLY_GUMROAD_SELLER_ID": "bench-seller",
    "TALLY_SMTP_URL": "smtp://127.0.0.1:9",
}
IN_PROCESS_THREADS = 8
CLIENTS = (1, 32)
#: The paced run offers this share of the rate the 32 clients reached as fast as answered.
PACED_SHARE = 0.5
#: `tally serve --workers N` on PostgreSQL as docs/operations.md's deployment block has it:
#: one process per core. One process, and two per core, are measured beside it.
PRODUCTION_WORKERS = os.cpu_count() or 1
PG_WORKERS = tuple(sorted({1, PRODUCTION_WORKERS, 2 * PRODUCTION_WORKERS}))
STOCK = 10**12
TALLY = str(Path(sys.executable).with_name("tally"))
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
DEBIT_BODY = b'{"amount":1}'


# --- CPU accounting (Linux /proc) ------------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants (uvicorn's worker processes)."""
    found = [root]
    for pid in found:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(child) for child in children)
    return found


def _process_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _machine_cpu() -> float:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(f) for f in fields]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICKS  # all but idle and iowait


def busy(seconds: float = 1.0) -> float:
    """The share of all cores busy over `seconds` of this process sleeping."""
    before = _machine_cpu()
    time.sleep(seconds)
    return (_machine_cpu() - before) / seconds / (os.cpu_count() or 1)


# --- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    key: str
    workers: int
    log: Path

    def cpu(self) -> float:
        return _process_cpu(_process_tree(self.process.pid))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tally(env: dict[str, str], directory: str, *args: str) -> str:
    done = subprocess.run(
        [TALLY, *args], env=env, cwd=directory, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"tally {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (it and its uvicorn workers), then SIGKILL.
    Until it is reaped here, its pid (the group's id) cannot be reused."""
    if process.returncode is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def serve(
    database_url: str, workers: int, directory: str, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """Migrate, create the platform and its key, and run `tally serve --workers N` until the
    block ends, however it ends."""
    env = {**os.environ, **(settings or {}), "TALLY_DATABASE_URL": database_url}
    tally(env, directory, "migrate")
    created = tally(env, directory, "platforms", "create", "bench", "--scopes", "read,spend,grant")
    key = created.strip().splitlines()[-1]
    port = free_port()
    log = Path(directory) / f"serve-{port}.log"
    workers_option = ("--workers", str(workers))
    with log.open("wb") as output:
        process = subprocess.Popen(
            [TALLY, "serve", "--host", "127.0.0.1", "--port", str(port), *workers_option],
            env=env,
            cwd=directory,
            stdout=output,
            stderr=output,
            start_new_session=True,  # its own process group, so its workers stop with it
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tally serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        yield Server(process, f"http://127.0.0.1:{port}", key, workers, log)
    except Exception:
        print(f"server log (last lines):\n{log.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        _stop(process)


# --- the load generator -----------------------------------------------------------------------


@dataclass
class Load:
    clients: int
    offered: float | None
    rate: float
    p50_ms: float
    p99_ms: float
    client_cpu_us: float
    server_cpu_us: float
    machine_cpu_us: float


Request = Callable[[int], tuple[str, bytes]]


def debit_request(names: list[str]) -> Request:
    def make(_: int) -> tuple[str, bytes]:
        return f"/v1/accounts/{random.choice(names)}/debits", DEBIT_BODY

    return make


def grant_request(names: list[str]) -> Request:
    body = f'{{"amount":{STOCK},"source":"promotional","reason":"bench stock"}}'.encode()

    def make(index: int) -> tuple[str, bytes]:
        return f"/v1/accounts/{names[index]}/grants", body

    return make


Post = Callable[[str, bytes, str], Awaitable[tuple[int, bytes]]]
Clients = Callable[[Server, int], AbstractAsyncContextManager[list[Post]]]


@asynccontextmanager
async def raw_clients(server: Server, clients: int) -> AsyncIterator[list[Post]]:
    """`clients` keep-alive HTTP/1.1 connections on asyncio streams, one POST in flight each.
    Only what uvicorn answers is understood: a status line, headers, a Content-Length body."""
    host, port = server.base_url.removeprefix("http://").split(":")
    fixed = (
        f"Host: {host}:{port}\r\nAuthorization: Bearer {server.key}\r\n"
        "Content-Type: application/json\r\n"
    )
    streams = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]

    def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Post:
        async def post(path: str, body: bytes, key: str) -> tuple[int, bytes]:
            head = (
                f"POST {path} HTTP/1.1\r\n{fixed}Idempotency-Key: {key}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            status, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines if line)
            if "content-length" not in headers or headers.get("connection") == "close":
                raise RuntimeError(f"unexpected answer for this client: {status} {headers}")
            return int(status.split()[1]), await reader.readexactly(int(headers["content-length"]))

        return post

    try:
        yield [connection(reader, writer) for reader, writer in streams]
    finally:
        for _, writer in streams:
            writer.close()


@asynccontextmanager
async def httpx_clients(server: Server, clients: int) -> AsyncIterator[list[Post]]:
    """One httpx.AsyncClient whose pool keeps `clients` connections alive."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"authorization": f"Bearer {server.key}", "content-type": "application/json"}
    async with httpx.AsyncClient(
        base_url=server.base_url, limits=limits, headers=headers, timeout=60
    ) as client:

        async def post(path: str, body: bytes, key: str) -> tuple[int, bytes]:
            answer = await client.post(path, content=body, headers={"idempotency-key": key})
            return answer.status_code, answer.content

        yield [post] * clients


CLIENT_KINDS: dict[str, Clients] = {"raw": raw_clients, "httpx": httpx_clients}


async def _drive(
    server: Server,
    client: Clients,
    make: Request,
    clients: int,
    *,
    opens: float = 0.0,
    closes: float = float("inf"),
    count: int | None = None,
    interval: float | None = None,
) -> list[float]:
    """Send `make(i)` POSTs, each with a fresh Idempotency-Key, from `clients` connections until
    `count` are sent or the clock (perf_counter) passes `closes`; return the latencies of those
    that finished between `opens` and `closes`. Each connection sends its next request as soon
    as it has the answer or, with `interval`, on a fixed schedule (staggered between
    connections) and a latency counts from the scheduled time, so a late send counts as waiting
    (no coordinated omission). Anything but 201 stops the benchmark."""
    latencies: list[float] = []
    sent = 0
    began = time.perf_counter()

    async def run(post: Post, phase: float) -> None:
        nonlocal sent
        scheduled = began + phase
        while count is None or sent < count:
            index = sent
            sent += 1
            path, body = make(index)
            if interval is None:
                started = time.perf_counter()
            else:
                await asyncio.sleep(scheduled - time.perf_counter())
                started, scheduled = scheduled, scheduled + interval
            status, answer = await post(path, body, secrets.token_hex(12))
            finished = time.perf_counter()
            if status != 201:
                raise RuntimeError(f"{path}: {status} {answer[:500]!r}")
            if finished > closes:
                return
            if finished >= opens:
                latencies.append(finished - started)

    async with client(server, clients) as posts:
        step = (interval or 0.0) / clients
        await asyncio.gather(*(run(post, i * step) for i, post in enumerate(posts)))
    return latencies


def send_all(server: Server, client: Clients, make: Request, count: int) -> None:
    asyncio.run(_drive(server, client, make, 32, count=count))


def _cpu_sample(server: Server) -> tuple[float, float, float]:
    return time.process_time(), server.cpu(), _machine_cpu()


def measure(
    server: Server,
    client: Clients,
    names: list[str],
    clients: int,
    seconds: float,
    offered: float | None = None,
) -> Load:
    """Debits from `clients` connections, as fast as answered or at `offered` per second in
    all: a warm-up, then `seconds` measured."""
    warmup = min(2.0, max(1.0, seconds / 4))
    opens = time.perf_counter() + warmup
    closes = opens + seconds
    samples: list[tuple[float, float, float]] = []

    async def sample_at(moment: float) -> None:
        await asyncio.sleep(moment - time.perf_counter())
        samples.append(_cpu_sample(server))

    async def run() -> list[float]:
        interval = None if offered is None else clients / offered
        load = _drive(
            server,
            client,
            debit_request(names),
            clients,
            opens=opens,
            closes=closes,
            interval=interval,
        )
        found, *_ = await asyncio.gather(load, sample_at(opens), sample_at(closes))
        return found

    latencies = asyncio.run(run())
    (client0, server0, machine0), (client1, server1, machine1) = samples
    done = len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Load(
        clients,
        offered,
        done / seconds,
        statistics.median(latencies) * 1000,
        cuts[98] * 1000,
        (client1 - client0) / done * 1e6,
        (server1 - server0) / done * 1e6,
        (machine1 - machine0) / done * 1e6,
    )


def describe(load: Load) -> str:
    if load.offered is None:
        return f"{load.clients} client{'s' if load.clients > 1 else ''}"
    return f"{load.clients} clients at {load.offered:,.0f}/s"


# --- running ----------------------------------------------------------------------------------


@dataclass
class Row:
    database: str
    command: str
    load: Load
    in_process: float

    @property
    def ratio(self) -> float:
        return self.load.rate / self.in_process


def in_process_rate(db: Database, names: list[str], seconds: float, label: str) -> float:
    """bench/ledger.py's Tally path on `db` (seeded), after a warm-up."""
    rate(tally_workers(db), db, names, IN_PROCESS_THREADS, min(1.0, seconds))  # warm-up
    cpu, machine = time.process_time(), _machine_cpu()
    found = rate(tally_workers(db), db, names, IN_PROCESS_THREADS, seconds)
    cpu, machine = time.process_time() - cpu, _machine_cpu() - machine
    print(
        f"[{label}] in-process, {IN_PROCESS_THREADS} threads: {found:6.0f} debits/s  cpu/req: "
        f"this process {cpu / (found * seconds) * 1e6:5.0f} us, "
        f"machine {machine / (found * seconds) * 1e6:5.0f} us",
        flush=True,
    )
    return found


@dataclass(frozen=True)
class Plan:
    names: list[str]
    seconds: float
    client: Clients


def over_http(
    kind: str,
    database_url: str,
    workers: int,
    command: str,
    plan: Plan,
    directory: str,
    settings: dict[str, str] | None = None,
) -> list[Load]:
    with serve(database_url, workers, directory, settings) as server:
        send_all(server, plan.client, grant_request(plan.names), len(plan.names))
        db = connect(database_url, pool_size=1)
        try:
            settle(db)
        finally:
            db.dispose()
        loads: list[Load] = []
        for clients, paced in [*((c, False) for c in CLIENTS), (max(CLIENTS), True)]:
            offered = loads[-1].rate * PACED_SHARE if paced else None
            load = measure(server, plan.client, plan.names, clients, plan.seconds, offered)
            loads.append(load)
            print(
                f"[{kind}] {command}, {describe(load):>22}: {load.rate:6.0f} debits/s  "
                f"p50 {load.p50_ms:6.2f} ms  p99 {load.p99_ms:6.2f} ms  cpu/req: client "
                f"{load.client_cpu_us:4.0f} us, server {load.server_cpu_us:5.0f} us, "
                f"machine {load.machine_cpu_us:5.0f} us",
                flush=True,
            )
        return loads


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A fresh schema, dropped after; yields a URL whose search_path points into it."""
    schema = f"tally_http_{secrets.token_hex(4)}"
    admin = create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def bench_sqlite(plan: Plan) -> list[Row]:
    with tempfile.TemporaryDirectory() as directory:
        with sqlite_database(directory) as db:
            seed(db, plan.names)
            settle(db)
            reference = in_process_rate(db, plan.names, plan.seconds, "sqlite")
        url = f"sqlite:///{directory}/http.db"
        loads = over_http("sqlite", url, 1, "tally serve", plan, directory)
    return [Row("sqlite", "tally serve", load, reference) for load in loads]


def bench_postgresql(plan: Plan) -> list[Row]:
    """The in-process rate is measured again just before each server, so that each ratio's two
    sides are measured minutes, not a quarter of an hour, apart."""
    rows: list[Row] = []
    with postgres_database() as db:
        seed(db, plan.names)
        settle(db)
        for workers in PG_WORKERS:
            reference = in_process_rate(db, plan.names, plan.seconds, "postgresql")
            command = f"tally serve --workers {workers}"
            with tempfile.TemporaryDirectory() as directory, postgres_schema_url() as url:
                loads = over_http(
                    "postgresql", url, workers, command, plan, directory, PRODUCTION_SETTINGS
                )
            rows.extend(Row("postgresql", command, load, reference) for load in loads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument(
        "--client", choices=sorted(CLIENT_KINDS), default="raw", help="load generator"
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every server is stopped and every schema dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [f"user-{n:04d}" for n in range(ACCOUNTS)]
    plan = Plan(names, args.seconds, CLIENT_KINDS[args.client])
    print(
        f"{os.cpu_count()} cores, {busy():.0%} busy before the run (other processes); "
        f"PostgreSQL production command: tally serve --workers {PRODUCTION_WORKERS}; "
        f"load generator: {args.client}",
        flush=True,
    )
    rows: list[Row] = []
    if args.only in (None, "sqlite"):
        rows += bench_sqlite(plan)
    if args.only in (None, "postgresql"):
        rows += bench_postgresql(plan)

    print(
        f"\n| database | server | clients | HTTP debits/s | p50 ms | p99 ms | "
        f"in-process debits/s ({IN_PROCESS_THREADS} threads) | HTTP / in-process |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        load = row.load
        ratio = "(paced)" if load.offered is not None else f"{row.ratio:.0%}"
        print(
            f"| {row.database} | `{row.command}` | {describe(load)} | {load.rate:,.0f} | "
            f"{load.p50_ms:.1f} | {load.p99_ms:.1f} | {row.in_process:,.0f} | {ratio} |"
        )
    print()
    production = f"tally serve --workers {PRODUCTION_WORKERS}"
    for row in rows:
        load = row.load
        target = row.database == "postgresql" and row.command == production
        label = f"{row.database}, {row.command}, {describe(load)}"
        if load.offered is not None:
            print(f"(paced, not a target) {label}: p99 {load.p99_ms:.1f} ms")
            continue
        if load.clients != max(CLIENTS):
            continue
        lines = (
            verdict(f"{label}: HTTP / in-process debit rate, %", row.ratio * 100, 50),
            verdict(f"{label}: p99 ms", load.p99_ms, 50, higher=False),
        )
        for line in lines:
            print(line if target else f"(for comparison, not the target) {line}")


if __name__ == "__main__":
    main()
