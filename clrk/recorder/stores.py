"""Which store `clrk_db` names, opened for the recorder (`open_store`) or for the CLI's reads when no
gateway runs (`ReadOnly`): the DuckDB file (`clrk.recorder.store`) or ClickHouse (`clrk.recorder.clickhouse`)."""

from __future__ import annotations

from collections.abc import Mapping

from clrk import storeref
from clrk.recorder.store import Store, StoreError, fetch_budgets, fetch_records, fetch_spend, open_readonly


def open_store(db: str):
    """The recorder's store for `clrk_db`: a DuckDB file, or ClickHouse for a `clickhouse://` URL."""
    if storeref.is_clickhouse(db):
        from clrk.recorder.clickhouse import ClickHouseStore

        try:
            return ClickHouseStore(db)
        except ValueError as e:
            raise StoreError(str(e)) from e
    return Store(db)


class ReadOnly:
    """The reads of `clrk records`, `clrk spend` when no gateway runs: straight from the DuckDB file or
    from ClickHouse (the fleet's store: every gateway's records, whichever recorder wrote them)."""

    def __init__(self, db: str):
        self.db = db
        if storeref.is_clickhouse(db):
            from clrk.recorder.clickhouse import ClickHouseStore

            try:
                self.store = ClickHouseStore(db)
            except ValueError as e:
                raise StoreError(str(e)) from e
            self.con = None
        else:
            self.store, self.con = None, open_readonly(db)

    def read(self, kind: str, query: Mapping) -> list[dict]:
        if self.store is not None:
            if kind == "spend":
                return self.store.spend(query)
            if kind == "budgets":
                return self.store.budgets(float(query.get("since") or 0))
            return self.store.records(query)
        if kind == "spend":
            return fetch_spend(self.con, query)
        if kind == "budgets":
            return fetch_budgets(self.con, float(query.get("since") or 0))
        return fetch_records(self.con, query)

    def close(self) -> None:
        (self.store or self.con).close()
