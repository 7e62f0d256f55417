"""The request path behind Recommend and Rank, as small named stages over one RequestContext.

    understand_query -> read_user -> embed -> retrieve_candidates -> pre_score
    -> read_head_features -> rank_head -> order_answer -> explain

Each stage reads what earlier stages left on the context (context.py) and adds its own product.
Every downstream call goes through the one guarded call (guarded.py): breaker, budget, timing,
metrics and a typed Degradation when the part is left out. `gateway.recommender.Recommender.run`
is the sequence; the stages live here so each can be tested with fake clients.
"""
