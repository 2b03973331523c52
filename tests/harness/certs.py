"""A throwaway CA and a server certificate for the fake upstreams (they stand in for real public hosts): the
same one `clrk demo` makes for its fake provider."""

from clrk.cli.demo.pki import make_upstream_pki

__all__ = ["make_upstream_pki"]
