"""What `clrk_db` / `CLRK_DB` names: a DuckDB file (the default) or a ClickHouse URL
(`clickhouse://user:pass@host:9000/db`, native protocol; `clickhouse+http://` or `clickhouse+https://`, HTTP).
Shared by the proxy, the recorder and the CLI; pure (no drivers imported here).

A URL carries a password, so nothing may print it, put it in a file name or on a command line: `display`
is the form for logs, status and errors, `local_dir` the directory for the files a store needs on this host
(the recorder's socket, its spool, the upstream trust bundle) instead of "the directory of the DB file".
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

SCHEMES = {"clickhouse": ("native", 9000), "clickhouse+native": ("native", 9000),
           "clickhouse+http": ("http", 8123), "clickhouse+https": ("https", 8443)}


def is_clickhouse(db: str | os.PathLike) -> bool:
    return isinstance(db, str) and db.split("://", 1)[0].lower() in SCHEMES and "://" in db


class ClickHouseTarget:
    """A parsed ClickHouse URL. Query options: `ttl_days=N` (rows older than N days are deleted by the
    server; needs ClickHouse 19.6 or later), `table=NAME` (default `records`), `secure=1` (TLS on the native
    protocol), `timeout=S` (connect and per-query timeout, default 10)."""

    def __init__(self, url: str):
        u = urlsplit(url)
        scheme = u.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"not a ClickHouse URL: {display(url)}")
        self.protocol, default_port = SCHEMES[scheme]
        self.host = u.hostname or "localhost"
        try:
            self.port = u.port or default_port
        except ValueError as e:
            raise ValueError(f"{display(url)}: the port is not a number") from e
        self.user = unquote(u.username) if u.username else "default"
        self.password = unquote(u.password) if u.password else ""
        self.database = unquote(u.path.strip("/")) or "default"
        opts = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(opts) - {"ttl_days", "table", "secure", "timeout"}
        if unknown:
            raise ValueError(f"{display(url)}: unknown option(s) {', '.join(sorted(unknown))} "
                             "(known: ttl_days, table, secure, timeout)")
        try:
            self.ttl_days = int(opts["ttl_days"]) if opts.get("ttl_days") else None
            self.timeout = float(opts.get("timeout") or 10)
        except ValueError as e:
            raise ValueError(f"{display(url)}: ttl_days and timeout are numbers") from e
        if self.ttl_days is not None and self.ttl_days < 1:
            raise ValueError(f"{display(url)}: ttl_days must be at least 1")
        self.table = opts.get("table") or "records"
        self.secure = self.protocol == "https" or opts.get("secure", "") in ("1", "true", "yes")
        for name in (self.database, self.table):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"{display(url)}: database and table names are letters, digits and _ only")
        self.url = url

    def __repr__(self) -> str:
        return f"ClickHouseTarget({display(self.url)})"


def display(db: str | os.PathLike) -> str:
    """`db` as it may be shown: a URL's password replaced by ***."""
    db = str(db)
    if not is_clickhouse(db):
        return db
    u = urlsplit(db)
    if u.password is None:
        return db
    netloc = u.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit((u.scheme, f"{userinfo}:***@{netloc[1]}", u.path, u.query, u.fragment))


def scrub(text: str, db: str | os.PathLike) -> str:
    """`text` (an error message, say) with `db`'s password replaced by ***, in every form it may take."""
    if not is_clickhouse(str(db)):
        return text
    u = urlsplit(str(db))
    if u.password:
        for form in {u.password, unquote(u.password)}:
            if form:
                text = text.replace(form, "***")
    return text


def key(db: str | os.PathLike) -> str:
    """A stable name for the store (no secret in it): the resolved file, or the URL without its password."""
    if is_clickhouse(str(db)):
        u = urlsplit(str(db))
        netloc = f"{u.username or ''}@{(u.hostname or '').lower()}:{u.port or ''}"
        return f"{u.scheme.lower()}://{netloc}/{u.path.strip('/')}?{u.query}"
    return str(Path(db).resolve())


def local_dir(db: str | os.PathLike) -> Path:
    """Where files of this store live on this host: beside a DuckDB file; for ClickHouse, a private
    directory per URL under CLRK_STATE_DIR (default: the temp dir)."""
    if not is_clickhouse(str(db)):
        return Path(db).resolve().parent
    digest = hashlib.sha256(key(db).encode()).hexdigest()[:20]
    base = Path(os.environ.get("CLRK_STATE_DIR") or tempfile.gettempdir())
    d = base / f"clrk-ch-{digest}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(d)  # a shared temp dir: the name is guessable, so it must be ours and private
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{d} is not a private directory of this user (spool and socket of "
                              f"{display(db)}); remove it or set CLRK_STATE_DIR")
    return d
