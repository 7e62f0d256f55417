"""Stage `features_personalization`: the user's profile and live session, one online-store round
trip; and the guarded online-store read the head's item features use too (rerank.py)."""

from __future__ import annotations

from gateway.catalog import Catalog
from gateway.degradation import Part
from gateway.features.online_reader import EntityFeatures
from gateway.pipeline.context import Request, RequestContext
from gateway.pipeline.services import Services
from gateway.scoring import UserView
from contract.session import SESSION_FEATURES


async def read_online(svc: Services, ctx: RequestContext, user_id: str, item_ids: list[str],
                      what: str) -> tuple[EntityFeatures | None, dict[str, EntityFeatures]]:
    """One guarded read of a user and items; (None, {}) without a store or when degraded.

    `what` names the stage (`features_<what>`) and the fallback (`no <what>`).
    """
    if svc.reader is None:
        return None, {}
    reader = svc.reader
    got = await svc.guard.call(Part.ONLINE_STORE, "features_" + what.replace(" ", "_"),
                               lambda _t: reader.aread(user_id, item_ids), ctx, f"no {what}",
                               reserve_s=svc.reserve_s)
    return (got.user, got.items) if got is not None else (None, {})


def user_view(feats: EntityFeatures, req: Request, catalog: Catalog) -> UserView:
    """The user's features as the scorer reads them. The stored session is used only when it is
    this request's session (or the request names none): another session's clicks say little."""
    has_session = feats.has("user_session") and (
        not req.session_id or feats.values.get("session_id") in ("", None, req.session_id))
    values = feats.values if has_session else {k: v for k, v in feats.values.items() if k not in SESSION_FEATURES}
    return UserView.build(values, catalog, feats.has("user_profile"), has_session)


async def read_user(ctx: RequestContext, svc: Services) -> None:
    """Fills `user` (an empty UserView for anonymous requests or when the store is left out)."""
    if not ctx.req.user_id:
        return
    feats, _ = await read_online(svc, ctx, ctx.req.user_id, [], "personalization")
    if feats is not None:
        ctx.user = user_view(feats, ctx.req, ctx.catalog)
