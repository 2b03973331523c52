"""clrk's steps, one job each and one file each, run in the order `clrk.proxy.gateway.Gateway` writes down:

  policy.PolicyLoader        options, policy load and hot reload, the mitmproxy settings clrk relies on
  auth.ProxyAuth             who is asking, and for where (Proxy-Authorization on CONNECT or per request)
  passthrough.Passthrough    TLS Passthrough listeners: CONNECT decided at L4, ClientHello checked, bytes relayed
  providers.Providers        model-provider calls recognised and parsed (gen_ai.* attributes, usage)
  egress.EgressControl       the decision; denials answered here; the last guard before any upstream connection;
                             where it allows a request, it runs (once) what follows an allow:
    routing.ProviderRouting    token budgets and Backends of the matched AIProviderRoute rule
    credentials.Credentials    provider keys injected on the upstream request
  capture.Capture            bounded body capture on the pass-through (feeds the provider parser)
  recording.Recording        one record per transaction, handed to the recorder process
  failsafe.Failsafe          last: nothing goes upstream without an allow decision, whatever failed above

The steps share one `Runtime` (clrk/proxy/runtime.py) and, per request, the `Transaction` in
`flow.metadata` (clrk/proxy/transaction.py). Each keeps mitmproxy's hook names and signatures; a step that
must wait returns an awaitable instead of being a coroutine function (the hot path stays plain calls).
"""
