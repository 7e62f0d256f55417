"""Rich tables of gateway answers for the CLI and the demo."""

from __future__ import annotations

from rich.table import Table

from recsys.v1 import common_pb2

SOURCE_SHORT = {common_pb2.CANDIDATE_SOURCE_QUERY: "query", common_pb2.CANDIDATE_SOURCE_INTEREST: "interest",
                common_pb2.CANDIDATE_SOURCE_SESSION: "session", common_pb2.CANDIDATE_SOURCE_POPULAR: "popular",
                common_pb2.CANDIDATE_SOURCE_CALLER: "caller"}


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
