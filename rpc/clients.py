"""A small synchronous client for the gateway (CLI, demo, tests)."""

from __future__ import annotations

import grpc

from recsys.v1 import recommend_pb2, recommend_pb2_grpc


class GatewayClient:
    def __init__(self, address: str, timeout_s: float = 2.0):
        self.channel = grpc.insecure_channel(address)
        self.stub = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        self.timeout_s = timeout_s

    def recommend(self, query: str = "", user_id: str = "", session_id: str = "", num_results: int = 10,
                  explain: bool = True, timeout_s: float | None = None, **fields) -> recommend_pb2.RecommendResponse:
        request = recommend_pb2.RecommendRequest(query=query, user_id=user_id, session_id=session_id,
                                                 num_results=num_results, explain=explain, **fields)
        return self.stub.Recommend(request, timeout=timeout_s or self.timeout_s)

    def rank(self, item_ids: list[str], query: str = "", user_id: str = "", explain: bool = True,
             timeout_s: float | None = None, **fields) -> recommend_pb2.RankResponse:
        request = recommend_pb2.RankRequest(item_ids=item_ids, query=query, user_id=user_id, explain=explain, **fields)
        return self.stub.Rank(request, timeout=timeout_s or self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
