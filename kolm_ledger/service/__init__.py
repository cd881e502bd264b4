"""The network edge: the ledger gRPC server, its clients, status mapping,
TLS and the authorization mechanism the three services share."""

__all__: list[str] = []
