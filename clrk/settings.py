"""Process settings from the environment (CLRK_POLICIES, CLRK_DB, ...), the defaults of the mitmproxy options."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLRK_", extra="ignore")

    policies: str = "policies"
    db: str = "data/clrk.duckdb"
    dev_otlp_fallback_endpoint: str = ""
    certs: str = "certs"
