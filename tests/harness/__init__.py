"""Real parts for tests: a TLS upstream, an OTLP/HTTP receiver, a gateway process, certificates."""
