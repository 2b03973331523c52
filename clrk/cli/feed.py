"""Records as they are stored, for `clrk tail` and the `clrk dev` TUI: polls the running gateway's recorder
for rows stored after the last one seen (by ingestion order: a record's `time` is when its transaction
started, so a long stream is stored after shorter ones that started later), tolerating a gateway that is
not up yet or restarts."""

from __future__ import annotations

from clrk import attributes as A
from clrk import wire
from clrk.recorder.store import SEQ


class RecordFeed:
    def __init__(self, db: str, query: dict | None = None, from_start: bool = False):
        self.socket = wire.socket_path(db)
        self.query = dict(query or {})
        self.last_seq: int | None = 0 if from_start else None  # None: begin at what is stored now
        self._client: wire.BlockingClient | None = None
        self.connected = False

    def _request(self, query: dict) -> list[dict]:
        if self._client is None:
            self._client = wire.BlockingClient(self.socket, timeout=10)
        return self._client.request({"t": "query", "query": query})["rows"]

    def poll(self, limit: int = 2000) -> list[dict]:
        """Records stored since the last poll, in storage order; [] while the gateway is unreachable."""
        try:
            if self.last_seq is None:
                if self._client is None:
                    self._client = wire.BlockingClient(self.socket, timeout=10)
                self.last_seq = int(self._client.request({"t": "status"})["seq"])
            rows = self._request({**self.query, "after_seq": self.last_seq, "limit": limit})
            self.connected = True
        except (OSError, wire.WireError):
            self.close()
            self.connected = False
            return []
        if rows:
            self.last_seq = max(r.pop(SEQ) for r in rows)
        return rows

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def mcp_summary(r: dict) -> str:
    """An MCP message's record in a few words: `tools/call search_repos`, `response #3`."""
    method = r.get(A.MCP_METHOD_NAME) or f"response #{r.get(A.JSONRPC_REQUEST_ID, '')}"
    target = r.get(A.GEN_AI_TOOL_NAME) or r.get(A.GEN_AI_PROMPT_NAME) or r.get(A.MCP_RESOURCE_URI)
    return f"{method} {target}" if target else str(method)
