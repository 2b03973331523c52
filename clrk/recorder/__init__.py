"""The recorder process: DuckDB store, OTLP export, and the socket the proxy and the CLI talk to."""
