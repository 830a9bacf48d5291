"""relay/http: the HTTP listener and the injection APIs.

Two public injection APIs are served so that existing client code works unchanged:
SparkPost's Transmissions API (``POST /api/v1/transmissions``, ``relay.http.sparkpost``)
and KumoMTA's inject API (``POST /api/inject/v1``, ``relay.http.kumo``). Their request
bodies are turned into rendered messages by a pure, I/O-free layer (``payload``: the
result types and errors; ``templates``: the SparkPost and Jinja template dialects;
``compose``: MIME building with the standard library ``email`` package); the listener and
the endpoints feed the result into the intake like any other carrier.
"""
