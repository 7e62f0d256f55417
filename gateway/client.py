"""A small synchronous client for the gateway (CLI, demo, tests) and a rich table of the answer."""

from __future__ import annotations

import grpc
from rich.table import Table

from recsys.v1 import common_pb2, recommend_pb2, recommend_pb2_grpc

SOURCE_SHORT = {common_pb2.CANDIDATE_SOURCE_QUERY: "query", common_pb2.CANDIDATE_SOURCE_INTEREST: "interest",
                common_pb2.CANDIDATE_SOURCE_SESSION: "session", common_pb2.CANDIDATE_SOURCE_POPULAR: "popular",
                common_pb2.CANDIDATE_SOURCE_CALLER: "caller"}


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


def response_table(response, titles: dict[str, str] | None = None, title: str = "") -> Table:
    """Rank, item, score and its parts, sources, reasons."""
    titles = titles or {}
    table = Table("#", "item", "score", "rel", "pers", "pop", "sources", "reasons", title=title)
    for item in response.items:
        b = item.breakdown
        name = titles.get(item.item_id, "")
        table.add_row(str(item.rank), f"{item.item_id} {name}".strip(), f"{item.score:.2f}", f"{b.relevance:.2f}",
                      f"{b.personalization:.2f}", f"{b.popularity:.2f}",
                      ",".join(SOURCE_SHORT.get(s, "?") for s in item.sources), "; ".join(item.reasons))
    return table
