"""gRPC plumbing shared by both services and their callers: server interceptors, structured logs, typed clients.
It imports only the contract and the generated protos (recsys.v1)."""
