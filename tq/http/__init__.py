"""The broker's HTTP side: REST API, OpenAPI document, /metrics, /health, /ready.

Contract: an ASGI app (Starlette) over the broker's service layer, served by
hypercorn's trio worker inside the broker's nursery (``serve_http`` in
server.py, started by ``tq.broker.server.serve_broker`` with
``nursery.start``) on its own port, TLS with the broker's certificate unless
the broker is ``--insecure``. Every route is thin: decode the request, check
the bearer key (``auth.authenticate``), call ONE ``BrokerService`` method,
encode the answer; TQErrors become RFC 9457 problem documents
(``problems.py``). docs/REST.md is the operator's page; ``openapi.py`` is the
machine-readable contract, kept true by tests/test_http.py (schemathesis).

Heavy imports (starlette, hypercorn, prometheus_client) happen only here,
and this package is imported only when a broker starts its HTTP side: never
by ``tq --help``, ``tq submit`` or a worker.

May import: starlette, hypercorn, prometheus_client, tq.broker, tq.core,
tq.config. Nothing imports tq.http except tq.broker.server (lazily).
"""
