"""Every attribute name clrk emits, in one place: the record contract.

The same names are the keys of `clrk records --json`, the span attributes, the log record attributes and
the DuckDB column names. `COLUMNS` is the whole record, in storage order, with its type; the store, the
exporter and the CLI all derive their shape from it, so adding an attribute is one line here (plus a store
migration).
"""

from __future__ import annotations

from typing import Final

# --- gen_ai.* (OpenTelemetry GenAI semantic conventions; the seed's names) ---
GEN_AI_SYSTEM: Final = "gen_ai.system"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_RESPONSE_STREAM: Final = "gen_ai.response.stream"
GEN_AI_USAGE_COST: Final = "gen_ai.usage.cost"  # USD (no semconv name yet; the contract's, as Langfuse/OpenLLMetry use)

GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"  # MCP tools/call: the tool
GEN_AI_PROMPT_NAME: Final = "gen_ai.prompt.name"  # MCP prompts/get: the prompt

# --- MCP (OpenTelemetry MCP semantic conventions): on the child record of each JSON-RPC request/response pair ---
MCP_METHOD_NAME: Final = "mcp.method.name"
MCP_SESSION_ID: Final = "mcp.session.id"  # a fingerprint (sha256:<16 hex>) of the Mcp-Session-Id, never the id
MCP_PROTOCOL_VERSION: Final = "mcp.protocol.version"
MCP_RESOURCE_URI: Final = "mcp.resource.uri"
JSONRPC_REQUEST_ID: Final = "jsonrpc.request.id"


def is_mcp_child(row) -> bool:
    """A child record of an MCP message (not a transaction): it names a method, or answers a request by id."""
    return MCP_METHOD_NAME in row or JSONRPC_REQUEST_ID in row

# --- HTTP / URL / server (OpenTelemetry HTTP semantic conventions) ---
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
URL_FULL: Final = "url.full"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"

# --- clrk.* ---
CLRK_COMPONENT: Final = "clrk.component"
CLRK_GATEWAY_NAME: Final = "clrk.gateway.name"
CLRK_APR_NAME: Final = "clrk.aiproviderroute.name"
CLRK_APR_NAMESPACE: Final = "clrk.aiproviderroute.namespace"
CLRK_APR_MATCHED: Final = "clrk.aiproviderroute.matched"
CLRK_DST_NAME: Final = "clrk.dst.name"
CLRK_REQ_BYTES: Final = "clrk.req.bytes"
CLRK_RESP_BYTES: Final = "clrk.resp.bytes"
CLRK_REQ_TRUNCATED: Final = "clrk.req.truncated"
CLRK_RESP_TRUNCATED: Final = "clrk.resp.truncated"
CLRK_BODY_BYTES: Final = "clrk.body.bytes"
CLRK_BODY_B64: Final = "clrk.body.b64"
CLRK_BODY_TRUNCATED: Final = "clrk.body.truncated"
CLRK_BODY_USAGE_VISIBLE: Final = "clrk.body.usage_visible"
CLRK_BODY_REQUEST_REWRITTEN: Final = "clrk.body.request_rewritten"
CLRK_DURATION_MS: Final = "clrk.duration_ms"
CLRK_COST_SOURCE: Final = "clrk.cost.source"  # where gen_ai.usage.cost's prices come from: "genai-prices X.Y.Z", policy, unknown
CLRK_BUDGET_DENIED: Final = "clrk.budget.denied"
CLRK_BUDGET_DAILY_USED: Final = "clrk.budget.daily_used"
CLRK_BUDGET_DAILY_MAX: Final = "clrk.budget.daily_max"
CLRK_BUDGET_POOL: Final = "clrk.budget.pool"  # which pool was charged (route rule, and agent for scope Agent)
CLRK_BUDGET_TOKENS: Final = "clrk.budget.tokens"  # what this transaction cost the pool
CLRK_BUDGET_RESERVED: Final = "clrk.budget.reserved"  # its estimate: reserved at admission, or what did not fit (429)
CLRK_BUDGET_DAILY_COST: Final = "clrk.budget.daily_cost"  # USD: the pool's spending today after this transaction
CLRK_BUDGET_DAILY_MAX_COST: Final = "clrk.budget.daily_max_cost"  # USD: the pool's maxCostPerDay
CLRK_BUDGET_COST: Final = "clrk.budget.cost"  # USD: what this transaction cost the pool
CLRK_L4_BYTES_UPSTREAM: Final = "clrk.l4.bytes_upstream"  # TLS Passthrough: bytes the agent sent upstream through the tunnel
CLRK_WS_MESSAGES_UP: Final = "clrk.ws.messages_up"  # WebSocket session: messages the agent sent
CLRK_WS_MESSAGES_DOWN: Final = "clrk.ws.messages_down"  # WebSocket session: messages the upstream sent
CLRK_WS_CLOSE_CODE: Final = "clrk.ws.close_code"  # WebSocket session: the close code it ended with
CLRK_WS_CLOSE_REASON: Final = "clrk.ws.close_reason"  # WebSocket session: the reason of that close frame
CLRK_WS_CLOSED_BY: Final = "clrk.ws.closed_by"  # WebSocket session: client | upstream | gateway
CLRK_DECISION: Final = "clrk.decision"
CLRK_DECISION_RULE: Final = "clrk.decision.rule"
CLRK_DECISION_REASON: Final = "clrk.decision.reason"
CLRK_RECORD_ESCAPED: Final = "clrk.record.escaped"  # fields whose bytes were not UTF-8, escaped as clrk.escape says
CLRK_RECORD_INCOMPLETE: Final = "clrk.record.incomplete"  # why values this record should hold are missing
CLRK_EXPORT_SAMPLED: Final = "clrk.export.sampled"  # its span and log were exported (spec.otlp.sampling); record only
CLRK_RESP_FIRST_CHUNK_MS: Final = "clrk.resp.first_chunk_ms"  # streamed answers: request start to first body bytes

# --- agent identity ---
AGENT_KIND: Final = "agent.kind"
AGENT_NAMESPACE: Final = "agent.namespace"
AGENT_NAME: Final = "agent.name"
AGENT_UID: Final = "agent.uid"
AGENT_REVISION: Final = "agent.revision"
INVOCATION_ID: Final = "invocation.id"

ERROR_TYPE: Final = "error.type"

# --- record-only keys (JSON lines and the log record body; never span attributes) ---
TIME: Final = "time"
TRACE_ID: Final = "trace_id"
SPAN_ID: Final = "span_id"
PARENT_SPAN_ID: Final = "parent_span_id"
END_TIME: Final = "end_time"
REQUEST_HEADERS: Final = "request.headers"
RESPONSE_HEADERS: Final = "response.headers"
REQUEST_BODY: Final = "request.body"
RESPONSE_BODY: Final = "response.body"

COMPONENT_EGRESS: Final = "egress-extproc"
OPERATION_EXECUTE_TOOL: Final = "execute_tool"  # gen_ai.operation.name of an MCP tools/call

# Column name -> DuckDB type, in storage order. `time`/`end_time` are epoch seconds in the proxy and
# TIMESTAMPTZ in the store; headers are JSON text.
COLUMNS: Final[dict[str, str]] = {
    TIME: "TIMESTAMPTZ",
    END_TIME: "TIMESTAMPTZ",
    TRACE_ID: "VARCHAR",
    SPAN_ID: "VARCHAR",
    PARENT_SPAN_ID: "VARCHAR",
    GEN_AI_SYSTEM: "VARCHAR",
    GEN_AI_PROVIDER_NAME: "VARCHAR",
    GEN_AI_OPERATION_NAME: "VARCHAR",
    GEN_AI_REQUEST_MODEL: "VARCHAR",
    GEN_AI_RESPONSE_MODEL: "VARCHAR",
    GEN_AI_RESPONSE_ID: "VARCHAR",
    GEN_AI_RESPONSE_FINISH_REASONS: "VARCHAR[]",
    GEN_AI_USAGE_INPUT_TOKENS: "BIGINT",
    GEN_AI_USAGE_OUTPUT_TOKENS: "BIGINT",
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: "BIGINT",
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: "BIGINT",
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: "BIGINT",
    GEN_AI_RESPONSE_STREAM: "BOOLEAN",
    GEN_AI_USAGE_COST: "DOUBLE",
    CLRK_COST_SOURCE: "VARCHAR",
    MCP_METHOD_NAME: "VARCHAR",
    GEN_AI_TOOL_NAME: "VARCHAR",
    GEN_AI_PROMPT_NAME: "VARCHAR",
    MCP_RESOURCE_URI: "VARCHAR",
    JSONRPC_REQUEST_ID: "VARCHAR",
    MCP_SESSION_ID: "VARCHAR",
    MCP_PROTOCOL_VERSION: "VARCHAR",
    HTTP_REQUEST_METHOD: "VARCHAR",
    HTTP_RESPONSE_STATUS_CODE: "INTEGER",
    URL_FULL: "VARCHAR",
    SERVER_ADDRESS: "VARCHAR",
    SERVER_PORT: "INTEGER",
    CLRK_COMPONENT: "VARCHAR",
    CLRK_GATEWAY_NAME: "VARCHAR",
    CLRK_APR_NAME: "VARCHAR",
    CLRK_APR_NAMESPACE: "VARCHAR",
    CLRK_APR_MATCHED: "BOOLEAN",
    CLRK_DST_NAME: "VARCHAR",
    CLRK_REQ_BYTES: "BIGINT",
    CLRK_RESP_BYTES: "BIGINT",
    CLRK_REQ_TRUNCATED: "BOOLEAN",
    CLRK_RESP_TRUNCATED: "BOOLEAN",
    CLRK_BODY_BYTES: "BIGINT",
    CLRK_BODY_B64: "BOOLEAN",
    CLRK_BODY_TRUNCATED: "BOOLEAN",
    CLRK_BODY_USAGE_VISIBLE: "BOOLEAN",
    CLRK_BODY_REQUEST_REWRITTEN: "BOOLEAN",
    CLRK_DURATION_MS: "DOUBLE",
    CLRK_RESP_FIRST_CHUNK_MS: "DOUBLE",
    CLRK_BUDGET_DENIED: "BOOLEAN",
    CLRK_BUDGET_DAILY_USED: "BIGINT",
    CLRK_BUDGET_DAILY_MAX: "BIGINT",
    CLRK_BUDGET_POOL: "VARCHAR",
    CLRK_BUDGET_TOKENS: "BIGINT",
    CLRK_BUDGET_RESERVED: "BIGINT",
    CLRK_BUDGET_DAILY_COST: "DOUBLE",
    CLRK_BUDGET_DAILY_MAX_COST: "DOUBLE",
    CLRK_BUDGET_COST: "DOUBLE",
    CLRK_L4_BYTES_UPSTREAM: "BIGINT",
    CLRK_WS_MESSAGES_UP: "BIGINT",
    CLRK_WS_MESSAGES_DOWN: "BIGINT",
    CLRK_WS_CLOSE_CODE: "INTEGER",
    CLRK_WS_CLOSE_REASON: "VARCHAR",
    CLRK_WS_CLOSED_BY: "VARCHAR",
    CLRK_DECISION: "VARCHAR",
    CLRK_DECISION_RULE: "VARCHAR",
    CLRK_DECISION_REASON: "VARCHAR",
    CLRK_RECORD_ESCAPED: "VARCHAR[]",
    CLRK_RECORD_INCOMPLETE: "VARCHAR",
    CLRK_EXPORT_SAMPLED: "BOOLEAN",
    AGENT_KIND: "VARCHAR",
    AGENT_NAMESPACE: "VARCHAR",
    AGENT_NAME: "VARCHAR",
    AGENT_UID: "VARCHAR",
    AGENT_REVISION: "VARCHAR",
    INVOCATION_ID: "VARCHAR",
    ERROR_TYPE: "VARCHAR",
    REQUEST_HEADERS: "JSON",
    RESPONSE_HEADERS: "JSON",
    REQUEST_BODY: "VARCHAR",
    RESPONSE_BODY: "VARCHAR",
}

# Keys that describe the record itself rather than the transaction: not span/log attributes.
NON_ATTRIBUTE_KEYS: Final = frozenset(
    {TIME, END_TIME, TRACE_ID, SPAN_ID, PARENT_SPAN_ID, REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY,
     CLRK_EXPORT_SAMPLED}
)
ATTRIBUTE_KEYS: Final = tuple(k for k in COLUMNS if k not in NON_ATTRIBUTE_KEYS)

# A header, query parameter, form field or JSON member whose name contains one of these (any case) is
# redacted in every output (clrk.redact); so are the explicit names below, the injected credential names and
# what a gateway's captureBody.redact adds.
SENSITIVE_WORDS: Final = ("key", "token", "secret", "auth", "password", "signature", "credential", "session", "cookie")
# Headers whose values never leave the proxy in any output, whatever their name says.
SENSITIVE_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "cookie", "set-cookie"}
)
# Query parameters (and form fields) redacted whatever their name says; `code` is an OAuth authorization code.
SENSITIVE_QUERY_PARAMS: Final = frozenset(
    {"key", "api_key", "apikey", "api-key", "access_token", "token", "client_secret", "password", "sig", "signature",
     "code"}
)
REDACTED: Final = "[REDACTED]"
