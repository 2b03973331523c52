"""The `clrk` command: run the gateway, read records, check policies."""

from __future__ import annotations

import argparse
import json
import os
import sys

from clrk import attributes as A
from clrk import storeref
from clrk.escape import json_line, printable
from clrk.launch import gateway_argv, gateway_env
from clrk.procstat import resident
from clrk.settings import Settings
from clrk.workers import supervisor_argv


def _die(msg: str, code: int = 1) -> None:
    print(f"clrk: {msg}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------- run


def _checked_policy(path: str):
    from clrk.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as e:
        _die(f"the policy in {path} is invalid:\n{e}")


def cmd_run(args: argparse.Namespace, extra: list[str]) -> None:
    from clrk.proxy.ca import ensure_ca

    policy = _checked_policy(args.policies)
    _check_workers(args)
    ports = [args.port] if args.port else []
    cert = ensure_ca(args.certs)
    argv = gateway_argv(args.policies, args.db, args.certs, ports, args.host, args.dev_otlp_fallback_endpoint, extra)
    where = _listening(policy, args.host, args.port)
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    if args.workers > 1:  # the supervisor (clrk/workers.py) takes this process's place and starts the workers
        argv = supervisor_argv(args.workers, where, argv)
    if args.host and not args.port and policy.listeners:
        print(f"clrk: --host {args.host} is not used: the policy's listeners bind their own address (a listener's "
              "`address` in the EgressGateway; --host applies with --port, or to a policy without listeners)",
              file=sys.stderr)
    print(
        f"clrk: gateway on {', '.join(where)}{workers}, policies {args.policies}, "
        f"records in {storeref.display(args.db)}\nclrk: agents trust {cert} and set "
        f"HTTPS_PROXY=http://<namespace>.<agent>:<token>@localhost:{where[0].rsplit(':', 1)[1]}  (clrk ca tells more)",
        file=sys.stderr,
        flush=True,
    )
    os.execve(argv[0], argv, gateway_env(args.db))


def _check_workers(args: argparse.Namespace) -> None:
    if args.workers < 1:
        _die(f"--workers {args.workers}: give 1 or more", 2)
    if args.workers > 1 and args.port == 0:
        _die(f"--workers {args.workers} cannot share port 0 (any free port: each worker would get its own); "
             "give a fixed --port", 2)


def _listening(policy, host: str, port: int | None) -> list[str]:
    """Where the gateway will listen ("address:port" each): `--port` alone if given, else the policy's listeners
    (or mitmproxy's 8080), `host` overriding addresses only for a policy without listeners."""
    if port:
        return [f"{host or '127.0.0.1'}:{port}"]
    from clrk.proxy.listeners import wanted_modes

    return [m.split("@", 1)[1] for m in wanted_modes(policy, host, None)]


# --------------------------------------------------------------------------- dev


def cmd_dev(args: argparse.Namespace) -> None:
    from clrk.cli.dev.session import DevSession
    from clrk.cli.dev.tui import DevApp
    from clrk.cli.feed import RecordFeed
    from clrk.proxy.ca import ensure_ca

    policy = _checked_policy(args.policies)
    _check_workers(args)
    ports = [args.port] if args.port else []
    ensure_ca(args.certs)
    where = _listening(policy, args.host, args.port)
    try:
        session = DevSession(args.policies, args.db, args.certs, ports, otlp_port=args.otlp_port, host=args.host,
                             listening=where, workers=args.workers).start()
    except (OSError, RuntimeError) as e:
        _die(str(e))
    assert session.receiver is not None
    try:
        DevApp(RecordFeed(args.db), session.receiver.spans, session.receiver.logs, session.read_spend, status=session.status,
               metrics=session.receiver.metrics).run()
    finally:
        session.stop()
    print(f"clrk dev: gateway stopped; its log is {session.log_path}", file=sys.stderr)


# --------------------------------------------------------------------------- ca


def cmd_ca(args: argparse.Namespace) -> None:
    from clrk.proxy.ca import ensure_ca

    cert = ensure_ca(args.certs).resolve()
    policy = _checked_policy(args.policies)
    port = (policy.listener_ports() or [8080])[0]
    agents = sorted(policy.agents)
    lines = [
        f"clrk's CA certificate: {cert}",
        "(its private key, mitmproxy-ca.pem beside it, is mode 0600 and never leaves this machine)",
        "",
        "Trust it in the agent's environment (each client reads its own variable: set them all):",
        f"  CA={cert}",
        "  export SSL_CERT_FILE=$CA REQUESTS_CA_BUNDLE=$CA CURL_CA_BUNDLE=$CA NODE_EXTRA_CA_CERTS=$CA",
        "    Python ssl, httpx and the openai / anthropic / google-genai SDKs: SSL_CERT_FILE; requests: REQUESTS_CA_BUNDLE",
        "    curl: CURL_CA_BUNDLE (it wins over SSL_CERT_DIR and SSL_CERT_FILE), or curl --cacert $CA",
        "    Node: NODE_EXTRA_CA_CERTS",
        "",
        "Send the agent's traffic through the gateway (the token is the agent's; only its sha256 is in the policy):",
    ]
    lines += [f"  export HTTPS_PROXY=http://{user}:<token>@{args.host}:{port}" for user in agents] or ["  (no Agent in the policy)"]
    lines += [
        "",
        "Node's fetch ignores HTTPS_PROXY: a Node agent set up as above alone goes around the gateway.",
        "  Node >= 24.5 or 22.21:  export NODE_USE_ENV_PROXY=1",
        "  Node 18 / 20 (npm install undici):  setGlobalDispatcher(new EnvHttpProxyAgent())  (from undici), or per client",
        "    new OpenAI({fetchOptions: {dispatcher: new ProxyAgent(process.env.HTTPS_PROXY)}})",
        "  docs/CLIENTS.md has the details.",
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------- records


def _store_name(db: str) -> str:
    """The store as the CLI names it: a DuckDB file's absolute path, a ClickHouse URL without its password."""
    return storeref.display(db) if storeref.is_clickhouse(db) else os.path.abspath(db)


def read_store(db: str, kind: str, query: dict) -> list[dict]:
    """Rows from the running gateway's recorder, or straight from the file when none runs.
    `kind` is "query" (records), "spend" or "budgets"."""
    from clrk import wire
    from clrk.recorder.store import StoreError
    from clrk.recorder.stores import ReadOnly

    path = wire.socket_path(db)
    try:
        with wire.BlockingClient(path) as c:
            return c.request({"t": kind, "query": query})["rows"]
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    except wire.WireError as e:
        _die(str(e))
    try:
        reader = ReadOnly(db)
        try:
            return reader.read(kind, query)
        finally:
            reader.close()
    except StoreError as e:
        _die(str(e))


def _line(r: dict, as_json: bool) -> str:
    """One record as one terminal-safe line: whatever the agent sent, it cannot break the line or reach the
    terminal as control sequences (`clrk.escape`)."""
    return json_line(r) if as_json else _table_lines([r], TAIL_WIDTHS)[0]


# The text view's columns; the last (destination: host:port and path, then error and reason) is left free.
COLUMNS = ("time", "agent", "decision", "method", "status", "ms", "model", "tokens", "usd")
# Widths `clrk tail` keeps (records arrive one by one); `clrk records` fits its columns to what it prints.
TAIL_WIDTHS = (24, 24, 8, 7, 6, 9, 24, 11, 11)
_RIGHT = {"status", "ms", "tokens", "usd"}
_MAX_WIDTH = 40  # a longer agent or model name is cut with "…" so that the columns stay aligned


def _cells(r: dict) -> list[str]:
    from urllib.parse import urlsplit

    agent = f"{r.get(A.AGENT_NAMESPACE)}/{r.get(A.AGENT_NAME)}" if r.get(A.AGENT_NAME) else "-"
    tokens = ""
    if r.get(A.GEN_AI_USAGE_INPUT_TOKENS) is not None:
        tokens = f"{r.get(A.GEN_AI_USAGE_INPUT_TOKENS)}/{r.get(A.GEN_AI_USAGE_OUTPUT_TOKENS) or 0}"
    usd = ""
    if isinstance(r.get(A.GEN_AI_USAGE_COST), (int, float)):
        from clrk.cost import format_usd

        usd = format_usd(r[A.GEN_AI_USAGE_COST])
    try:
        path = urlsplit(r.get(A.URL_FULL) or "").path
    except ValueError:
        path = ""
    dest = f"{r.get(A.SERVER_ADDRESS, '')}:{r.get(A.SERVER_PORT, '')}{path}"
    if r.get(A.ERROR_TYPE):
        dest += f"  error={r[A.ERROR_TYPE]}"
    if r.get(A.CLRK_DECISION) == "deny":
        dest += f"  ({r.get(A.CLRK_DECISION_REASON)})"
    method, what = str(r.get(A.HTTP_REQUEST_METHOD) or ""), str(r.get(A.GEN_AI_REQUEST_MODEL) or "")
    if A.is_mcp_child(r):  # an MCP message: its method and tool (or prompt, resource) where a model would be
        from clrk.cli.feed import mcp_summary

        method, what = "MCP", mcp_summary(r)
    cells = [f"{(r.get(A.TIME) or '')[:23]}Z", agent, str(r.get(A.CLRK_DECISION) or "-"), method,
             str(r.get(A.HTTP_RESPONSE_STATUS_CODE) or "-"), f"{r.get(A.CLRK_DURATION_MS) or 0:.1f}",
             what, tokens, usd, dest]
    return [printable(c) for c in cells]


def _table_lines(rows: list[dict], widths: tuple[int, ...] | None = None, header: bool = False) -> list[str]:
    """Records as aligned text lines (`widths` fixed, or fitted to these rows), with a header line if asked."""
    table = [_cells(r) for r in rows]
    if widths is None:
        widths = tuple(min(_MAX_WIDTH, max([len(h), *(len(row[i]) for row in table)])) for i, h in enumerate(COLUMNS))
    out = []
    for row in ([[*COLUMNS, "destination"]] if header else []) + table:
        cells = []
        for name, cell, w in zip(COLUMNS, row, widths, strict=False):
            if len(cell) > w:
                cell = cell[: w - 1] + "…"
            cells.append(cell.rjust(w) if name in _RIGHT else cell.ljust(w))
        out.append(("  ".join(cells) + "  " + row[-1]).rstrip())
    return out


def _check_since(since: str | None) -> None:
    """A `--since` the store cannot read is a usage error, said before anything is asked of it."""
    from clrk.recorder.store import parse_since

    if since:
        try:
            parse_since(since)
        except ValueError as e:
            _die(str(e), 2)


def cmd_records(args: argparse.Namespace) -> None:
    _check_since(args.since)
    query = {
        "agent": args.agent,
        "since": args.since,
        "status": args.status,
        "host": args.host,
        "invocation": args.invocation,
        "decision": args.decision,
        "mcp": args.mcp,
        "limit": args.limit,
    }
    rows = read_store(args.db, "query", query)
    out = sys.stdout
    human = out.isatty() and not args.json
    lines = [json_line(r) for r in rows] if args.json else _table_lines(rows, header=human)
    if human:  # on a terminal: which store, and how much of it (piped, the records only, one per line)
        shown = "all" if not args.limit else f"at most {args.limit} (--limit)"
        out.write(printable(f"{len(rows)} records from {_store_name(args.db)}, newest first, {shown}") + "\n")
    for line in lines:
        out.write(line + "\n")


# --------------------------------------------------------------------------- tail


def cmd_tail(args: argparse.Namespace) -> None:
    import time

    from clrk.cli.feed import RecordFeed

    feed = RecordFeed(args.db, query={"agent": args.agent, "invocation": args.invocation, "host": args.host})
    said = None  # what tail last said of its state on stderr: "following" or "waiting"
    if not args.json and sys.stdout.isatty():
        print(_table_lines([], TAIL_WIDTHS, header=True)[0], flush=True)
    try:
        while True:
            rows = feed.poll()
            state = "following" if feed.connected else "waiting"
            if state != said:
                print(f"clrk tail: following the gateway writing {_store_name(args.db)}; waiting for its next records "
                      "(Ctrl-C to stop)" if feed.connected else f"clrk tail: waiting for a gateway writing "
                      f"{_store_name(args.db)} ...",
                      file=sys.stderr, flush=True)
                said = state
            for r in rows:
                sys.stdout.write(_line(r, args.json) + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        feed.close()


# --------------------------------------------------------------------------- status


def _rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` in MB (Linux /proc), or None."""
    rss = resident(pid)
    return None if rss is None else round(rss / 2**20, 1)


def _memory(recorder_pid: int) -> dict:
    """The footprint of a gateway: its recorder and the proxy process that started it (the recorder's parent)."""
    out: dict = {"recorder_rss_mb": _rss_mb(recorder_pid)}
    try:
        with open(f"/proc/{recorder_pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return out
    if ppid > 1:
        out.update(proxy_pid=ppid, proxy_rss_mb=_rss_mb(ppid))
    return out


def cmd_status(args: argparse.Namespace) -> None:
    from clrk import wire

    try:
        with wire.BlockingClient(wire.socket_path(args.db), timeout=10) as c:
            st = c.request({"t": "status"})
    except (OSError, wire.WireError):
        _die(f"no gateway is writing {_store_name(args.db)} (its recorder does not answer on {wire.socket_path(args.db)})")
    st = {k: v for k, v in st.items() if k not in ("t", "id")}
    st.update(_memory(st["pid"]))
    for w in st.get("workers") or ():
        pid, index = w.get("pid"), w.get("worker")
        w["rss_mb"] = _rss_mb(pid) if isinstance(pid, int) else None
        if isinstance(pid, int) and isinstance(index, int):
            from clrk.balance import open_connections

            w["connections"] = open_connections(pid, index)
    if args.json:
        print(json.dumps(st))
    else:
        at_proxy = f" ({st['dropped_at_proxy']} of them by the proxy)" if st.get("dropped_at_proxy") else ""
        print(f"recorder pid {st['pid']} for {_store_name(args.db)}: {st['written']} records written this run, "
              f"{st['buffered'] + st.get('unwritten', 0)} waiting, {st['dropped']} dropped{at_proxy}; "
              f"{st['proxies']} proxy process(es) connected")
        workers = [w for w in st.get("workers") or () if w.get("worker") is not None]
        if workers:  # clrk run --workers N: one line each
            for line in worker_lines(workers):
                print(line)
            if st.get("recorder_rss_mb") is not None:
                print(f"memory (RSS): recorder {st['recorder_rss_mb']} MB")
        elif st.get("recorder_rss_mb") is not None:
            proxy = f"proxy (pid {st['proxy_pid']}) {st['proxy_rss_mb']} MB, " if st.get("proxy_rss_mb") is not None else ""
            print(f"memory (RSS): {proxy}recorder {st['recorder_rss_mb']} MB")
        if st.get("incomplete"):
            print(f"{st['incomplete']} records stored incomplete: values they should hold could not be stored "
                  "(clrk.record.incomplete says which; the gateway log names each)")
        if st.get("export_dropped"):
            print(f"OTLP export: {st['export_dropped']} spans and log records dropped (the endpoint was slow or down; "
                  "the store has them all)")
        if st.get("store_error"):
            print(f"the store cannot be written: {printable(st['store_error'])}")
            if st.get("unwritten"):
                on_disk = f", {st['spooled']} of them also on disk" if st.get("spooled") else ""
                print(f"{st['unwritten']} records wait for it{on_disk}; they are written, in order, once it can be")
        for bs in st.get("budget_stores") or ():
            print(budget_store_line(bs))
        if st.get("budget_ledger"):
            print(budget_ledger_line(st["budget_ledger"]))


def budget_ledger_line(bl: dict) -> str:
    """`clrk status`'s line for the budget ledger the recorder holds (clrk_budget_store=recorder)."""
    head = "budget ledger held by this recorder"
    if not bl.get("ready"):
        return f"{head}: NOT READY ({printable(str(bl.get('reason') or ''))}); budgeted calls follow onUnavailable"
    return (f"{head}: {bl.get('pools', 0)} pool day(s), {bl.get('proxies', 0)} proxy process(es); "
            f"{bl.get('admissions', 0)} admitted, {bl.get('refusals', 0)} refused, {bl.get('settlements', 0)} "
            f"settled; {bl.get('released', 0)} pool day(s) released from processes gone")


def worker_lines(workers: list[dict], now: float | None = None) -> list[str]:
    """`clrk status`'s lines for the workers of `clrk run --workers N`: index, pid, restarts, RSS, open client
    connections, records."""
    import time

    now = time.time() if now is None else now
    out = []
    for w in workers:
        rss = f"{w['rss_mb']} MB" if w.get("rss_mb") is not None else "? MB"
        restarts = f", restarted {w['restarts']}x" if w.get("restarts") else ""
        up = max(0, int(now - float(w.get("since") or now)))
        conns = f"{w['connections']} open connections, " if w.get("connections") is not None else ""
        out.append(f"worker {w.get('worker')} pid {w.get('pid')}{restarts}: RSS {rss}, {conns}{w.get('records', 0)} records "
                   f"received, connected {up // 3600}h{up // 60 % 60:02d}m{up % 60:02d}s")
    return out


def budget_store_line(bs: dict) -> str:
    """`clrk status`'s line for a proxy's shared budget store: in use, or unreachable and what is done meanwhile."""
    import datetime as dt

    url = printable(str(bs.get("url")))
    queued = f"{bs.get('queued', 0)} settlement(s) waiting to be sent, {bs.get('dropped', 0)} lost"
    if bs.get("available"):
        return f"budget store {url}: shared ({queued})"
    since = dt.datetime.fromtimestamp(float(bs.get("down_since") or 0), dt.UTC).strftime("%H:%M:%S UTC")
    modes = []
    for name, mode in (bs.get("gateways") or {}).items():
        if mode == "failOpen":
            modes.append(f"{printable(name)}: failOpen, budgeted calls admitted on this gateway's own ledger")
        else:
            modes.append(f"{printable(name)}: failClosed, budgeted calls refused (503)")
    return (f"budget store {url}: UNAVAILABLE since {since} ({printable(str(bs.get('reason') or ''))}); "
            f"{'; '.join(modes) or 'no gateway'}; {bs.get('fail_open_admissions', 0)} admitted locally, "
            f"{bs.get('fail_closed_refusals', 0)} refused so far; {queued}")


# --------------------------------------------------------------------------- spend


def cmd_spend(args: argparse.Namespace) -> None:
    import time

    from clrk.cost import format_usd
    from clrk.proxy.budget import day_start, utc_day

    _check_since(args.since)
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    bad = [b for b in by if b not in ("day", "agent", "route", "model")]
    if bad:
        _die(f"--by {','.join(bad)}: choose from day, agent, route, model", 2)
    rows = read_store(args.db, "spend", {"by": by, "since": args.since, "agent": args.agent, "route": args.route,
                                         "model": args.model, "usd": args.usd})
    budgets = read_store(args.db, "budgets", {"since": day_start(utc_day(time.time()))}) if args.budgets else []
    out = sys.stdout
    if args.json:
        for r in rows:
            out.write(json_line(r) + "\n")
        for b in budgets:
            out.write(json_line({"budget": b}) + "\n")
        return
    header = [*by, "requests", "input", "output", "total"] + (["usd", "unpriced"] if args.usd else [])
    table = [[printable(str(r.get(b) if r.get(b) is not None else "-")) for b in by]
             + [str(r["requests"]), str(r["input_tokens"]), str(r["output_tokens"]), str(r["total_tokens"])]
             + ([format_usd(r.get("cost_usd")), str(r.get("unpriced") or 0)] if args.usd else []) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip() + "\n")
    for row in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if budgets:
        out.write("\nbudgets today (UTC)\n")
        for b in budgets:
            mx = b["max_tokens"] if b["max_tokens"] is not None else "?"
            left = b["left_tokens"] if b["left_tokens"] is not None else "?"
            line = f"  {printable(b['pool'])}: {b['used_tokens']} of {mx} tokens used, {left} left"
            if b.get("max_usd") is not None:
                line += (f"; {format_usd(b.get('used_usd'))} of {format_usd(b['max_usd'])} spent, "
                         f"{format_usd(b.get('left_usd'))} left")
            out.write(line + "\n")


# --------------------------------------------------------------------------- policy


def cmd_policy_check(args: argparse.Namespace) -> None:
    from clrk.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.path)
    except PolicyError as e:
        print(str(e), file=sys.stderr)
        sys.exit(1)
    for w in policy.warnings:
        print(f"warning: {w}", file=sys.stderr)
    counts: dict[str, int] = {}
    for sd in policy.documents:
        counts[sd.doc.kind] = counts.get(sd.doc.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    n = len(policy.warnings)
    warned = f"; {n} warning{'s' * (n != 1)}" if n else ""
    print(f"{args.path}: ok ({summary}){warned}")
    if n and args.strict:
        sys.exit(1)


def cmd_policy_schema(args: argparse.Namespace) -> None:
    from clrk.policy import json_schema

    print(json.dumps(json_schema(), indent=2))


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> None:
    from clrk.cli.demo import run

    sys.exit(run(keep=args.keep, port=args.port, workdir=args.dir))


# --------------------------------------------------------------------------- main


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clrk")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


WORKERS_HELP = ("gateway processes sharing the ports and the recorder, e.g. the number of cores; over 1, a supervisor "
                "starts them and restarts one that dies (default: %(default)s, env CLRK_WORKERS)")


def build_parser(s: Settings | None = None) -> argparse.ArgumentParser:
    """The command line; `s` gives the defaults (the environment's CLRK_* settings unless given)."""
    if s is None:
        from pydantic import ValidationError

        try:
            s = Settings()
        except ValidationError as e:  # e.g. CLRK_WORKERS=many
            _die("; ".join(f"CLRK_{str(err['loc'][0]).upper()}: {err['msg']}" for err in e.errors()), 2)
    p = argparse.ArgumentParser(prog="clrk", description="clrk: the egress gateway for AI agents")
    p.add_argument("--version", action="version", version=f"clrk {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (mitmdump with the clrk addon); args after -- go to mitmdump",
                         usage="clrk run [options] [-- mitmdump args ...]",
                         description="Runs the gateway: mitmdump with clrk's addon built in, under python -O, on the "
                                     "EgressGateway's listeners.",
                         epilog="Everything after -- is passed to mitmdump as is, e.g. clrk run -- --set tcp_timeout=120 "
                                "or -- --set termlog_verbosity=warn.")
    run.add_argument("--policies", default=s.policies, help="policy file or directory (default: %(default)s)")
    run.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    run.add_argument("--certs", default=s.certs, help="CA directory (default: %(default)s)")
    run.add_argument("--port", type=int, default=None, help="listen on this port only (default: the EgressGateway listeners)")
    run.add_argument("--host", default="", help="listen address with --port, or for a policy without listeners "
                    "(default 127.0.0.1); declared listeners bind their own `address`")
    run.add_argument("--workers", type=int, default=s.workers, help=WORKERS_HELP)
    run.add_argument("--dev-otlp-fallback-endpoint", default=s.dev_otlp_fallback_endpoint, help=argparse.SUPPRESS)

    rec = sub.add_parser("records", help="print recorded transactions, newest first (works while the gateway runs)")
    rec.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    rec.add_argument("--json", action="store_true", help="one JSON object per line, keys as in the record contract")
    rec.add_argument("--limit", type=int, default=100, help="at most N records (0 = all; default %(default)s)")
    rec.add_argument("--agent", help="agent name, or namespace/name")
    rec.add_argument("--since", help="e.g. 15m, 1h, 2d, or an ISO time")
    rec.add_argument("--status", type=int, help="HTTP status code")
    rec.add_argument("--host", help="destination host (or *.suffix)")
    rec.add_argument("--invocation", help="invocation.id")
    rec.add_argument("--decision", choices=["allow", "deny"], help="only allowed or only denied transactions")
    rec.add_argument("--mcp", action="store_true",
                     help="only MCP messages (one record per JSON-RPC request/response pair: server, method, tool, outcome)")

    dv = sub.add_parser("dev", help="the gateway with an in-process OTLP receiver and a live terminal UI")
    dv.add_argument("--policies", default=s.policies, help="policy file or directory (default: %(default)s)")
    dv.add_argument("--port", type=int, default=None, help="listen on this port only (default: the EgressGateway listeners)")
    dv.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    dv.add_argument("--certs", default=s.certs, help="CA directory (default: %(default)s)")
    dv.add_argument("--host", default="", help="listen address with --port, or for a policy without listeners "
                    "(default 127.0.0.1); declared listeners bind their own `address`")
    dv.add_argument("--workers", type=int, default=s.workers, help=WORKERS_HELP)
    dv.add_argument("--otlp-port", type=int, default=14318, help="the in-process OTLP/HTTP receiver's port (default: %(default)s)")

    tl = sub.add_parser("tail", help="print records as the gateway stores them (one line each, or --json)")
    tl.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    tl.add_argument("--json", action="store_true", help="one JSON object per line, keys as in the record contract")
    tl.add_argument("--agent", help="agent name, or namespace/name")
    tl.add_argument("--invocation", help="invocation.id")
    tl.add_argument("--host", help="destination host")
    tl.add_argument("--interval", type=float, default=0.25, help=argparse.SUPPRESS)

    ca = sub.add_parser("ca", help="where the gateway's CA is, how to trust it, and the HTTPS_PROXY line of each agent")
    ca.add_argument("--certs", default=s.certs, help="CA directory (default: %(default)s)")
    ca.add_argument("--policies", default=s.policies, help="policy file or directory (default: %(default)s)")
    ca.add_argument("--host", default="localhost", help="the gateway's host name as agents reach it (default: %(default)s)")

    stt = sub.add_parser("status", help="is a gateway writing this store; records written, waiting and dropped")
    stt.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    stt.add_argument("--json", action="store_true")

    sp = sub.add_parser("spend", help="tokens spent by provider calls, by day, agent, route and model (works while the gateway runs)")
    sp.add_argument("--db", default=s.db, help="DuckDB file or ClickHouse URL (default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument("--by", default="day,agent,route,model", help="grouping, any of day,agent,route,model (default: all)")
    sp.add_argument("--since", help="e.g. 1h, 7d, or an ISO time")
    sp.add_argument("--agent", help="namespace/name")
    sp.add_argument("--route", help="namespace/name of an AIProviderRoute")
    sp.add_argument("--model", help="requested model")
    sp.add_argument("--budgets", action="store_true", help="also show today's usage of each token budget pool")
    sp.add_argument("--usd", action="store_true", help="add what the calls cost in US dollars (gen_ai.usage.cost) and "
                    "how many had no known price, largest first")

    dm = sub.add_parser("demo", help="the AI features in a minute: a gateway and a local fake provider, OpenAI, Anthropic "
                        "and Gemini calls with the official SDKs (one over budget), then spend and records")
    dm.add_argument("--port", type=int, default=None, help="the gateway's port on 127.0.0.1 (default: a free one)")
    dm.add_argument("--dir", default=None, help="work in this directory, and keep it (default: a temporary one)")
    dm.add_argument("--keep", action="store_true", help="keep the temporary directory (policy, store, logs)")

    pol = sub.add_parser("policy", help="check a policy, or print its JSON Schema")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    chk = psub.add_parser("check", help="validate a policy file or directory: exit 1 with every error listed; "
                          "warnings (references that lead nowhere) are printed")
    chk.add_argument("path", nargs="?", default=s.policies, help="policy file or directory (default: %(default)s)")
    chk.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    psub.add_parser("schema", help="print the JSON Schema of a policy document")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "run":
        cmd_run(args, extra)
    elif args.command == "policy":
        (cmd_policy_check if args.policy_command == "check" else cmd_policy_schema)(args)
    else:
        {"records": cmd_records, "spend": cmd_spend, "dev": cmd_dev, "status": cmd_status, "tail": cmd_tail,
         "ca": cmd_ca, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    main()
