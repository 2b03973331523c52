"""Real MCP servers (the official `mcp` package's MCPServer, Streamable HTTP) over TLS on 127.0.0.1, for the
gateway to reach through `upstreamTLS.hostAliases`: answering on SSE streams, with JSON bodies, or over the
older HTTP+SSE transport (`legacy`). Each
keeps the tool calls it executed and the bearer token each request carried, for tests to check what arrived."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.harness.gateway import free_port

TOOLS = ("search_repos", "get_issue", "delete_repository", "search_confirmed")


class Confirm(BaseModel):
    ok: bool


class McpUpstream:
    def __init__(self, server_pem: Path, json_response: bool = False, legacy: bool = False):
        self.called: list[tuple[str, dict]] = []
        self.authorizations: list[str | None] = []
        server = MCPServer("clrk-test")

        @server.tool()
        def search_repos(query: str) -> str:
            """Search repositories."""
            self.called.append(("search_repos", {"query": query}))
            return f"found: {query}"

        @server.tool()
        def get_issue(number: int) -> str:
            """Get an issue."""
            self.called.append(("get_issue", {"number": number}))
            if number < 0:
                raise ValueError("no such issue")
            return f"issue {number}"

        @server.tool()
        def delete_repository(name: str) -> str:
            """Delete a repository."""
            self.called.append(("delete_repository", {"name": name}))
            return f"deleted {name}"

        @server.tool()
        async def search_confirmed(query: str, ctx: Context) -> str:
            """Search once the user confirms: a progress notification, then an elicitation (a request from the server)."""
            await ctx.report_progress(0.5, 1.0, f"about to search {query}")
            answer = await ctx.elicit(f"search {query}?", Confirm)
            self.called.append(("search_confirmed", {"query": query, "action": answer.action}))
            return f"confirmed: {answer.action}"

        open_host = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        if legacy:  # the older HTTP+SSE transport: GET /sse announces the POST endpoint /messages/?session_id=
            app = server.sse_app(transport_security=open_host)
        else:
            app = server.streamable_http_app(json_response=json_response, transport_security=open_host)
        self.port = free_port()
        config = uvicorn.Config(self._seeing(app), host="127.0.0.1", port=self.port, ssl_certfile=str(server_pem),
                                ssl_keyfile=str(server_pem), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.02)

    def _seeing(self, app: ASGIApp) -> ASGIApp:
        async def seen(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                auth = dict(scope["headers"]).get(b"authorization")
                self.authorizations.append(auth.decode() if auth is not None else None)
            await app(scope, receive, send)
        return seen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
