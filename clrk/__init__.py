"""clrk: an egress gateway for AI agents, built as a mitmproxy addon."""
