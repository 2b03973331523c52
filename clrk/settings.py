"""Process settings from the environment (CLRK_POLICIES, CLRK_DB, ...), the defaults of the mitmproxy options
clrk adds (`clrk_policies`, ...). The descriptions are those options' help, and docs/CLI.md's."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLRK_", extra="ignore")

    policies: str = Field("policies", description="clrk: policy file or directory (env CLRK_POLICIES).")
    db: str = Field("data/clrk.duckdb", description=(
        "clrk: where records are stored: a DuckDB file, or ClickHouse for a fleet "
        "(clickhouse://user:pass@host:9000/db, clickhouse+http://...:8123/db; env CLRK_DB)."))
    dev_otlp_fallback_endpoint: str = Field("", description=(
        "clrk: dev tee; every span and log record is also sent to this OTLP/HTTP base URL (empty = off)."))
    certs: str = Field("certs", description="clrk: directory of the gateway's CA (env CLRK_CERTS).")
    budget_store: str = Field("", description=(
        "clrk: shared budget ledger, redis://[user:password@]host:port/db (or rediss://, unix://): every gateway "
        "naming the same Redis shares each pool's day; or `recorder`: held by the recorder of clrk_db, shared by "
        "every proxy process on this host writing that store (env CLRK_BUDGET_STORE; empty = this process's own "
        "ledger)."))
    workers: int = Field(1, description=(
        "clrk: gateway processes `clrk run` and `clrk dev` start, sharing the listening ports and one recorder "
        "(env CLRK_WORKERS; 1 = one process, no supervisor; the number of cores to use them all)."))


def option_help(name: str) -> str:
    """The help of mitmproxy option `clrk_<name>`."""
    return Settings.model_fields[name].description or ""
