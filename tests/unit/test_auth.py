"""API keys and roles (rpc/auth.py) on a real in-process grpc.aio server with the project's services'
method names: who gets UNAUTHENTICATED, who gets PERMISSION_DENIED, rotation without restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rpc.auth import (Authenticate, KeyFileError, KeyStore, caller_var, check, hash_key, key_line, new_key,
                      parse_keys)
from recsys.v1 import feedback_pb2, feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc

SHOP, GATEWAY, ADMIN_KEY = new_key(), new_key(), new_key()


class Recommend(recommend_pb2_grpc.RecommendServiceServicer):
    async def Recommend(self, request, context):  # noqa: N802 - gRPC's names
        return recommend_pb2.RecommendResponse(request_id=caller_var.get())


class Feedback(feedback_pb2_grpc.FeedbackServiceServicer):
    async def LogServed(self, request, context):  # noqa: N802
        return feedback_pb2.LogServedResponse()


def _keys(path: Path) -> Path:
    path.write_text("\n".join([
        "# name roles sha256",
        key_line("shop", ["recommend", "events"], SHOP),
        key_line("gateway", ["internal"], GATEWAY),
        key_line("ops", ["admin"], ADMIN_KEY) + "  # may call everything",
    ]) + "\n")
    return path


async def _serve(store: KeyStore):
    server = grpc.aio.server(interceptors=[Authenticate(store)])
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(Recommend(), server)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(Feedback(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_roles_decide_who_may_call_what(tmp_path: Path) -> None:
    async def run() -> None:
        server, channel = await _serve(KeyStore(_keys(tmp_path / "keys")))
        rec = recommend_pb2_grpc.RecommendServiceStub(channel)
        fb = feedback_pb2_grpc.FeedbackServiceStub(channel)
        req = recommend_pb2.RecommendRequest(query="x")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rec.Recommend(req)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <key>" in e.value.details()
            assert await _code(rec.Recommend(req, metadata=(("authorization", "Basic abc"),))) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(rec.Recommend(req, metadata=(("authorization", "Bearer " + new_key()),))) == \
                grpc.StatusCode.UNAUTHENTICATED
            ok = await rec.Recommend(req, metadata=(("authorization", "Bearer " + SHOP),))
            assert ok.request_id == "shop"  # the handler saw the caller's key name
            # The shop's key may not feed the learner; the gateway's may, and may not recommend.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await fb.LogServed(feedback_pb2.LogServedRequest(), metadata=(("authorization", "Bearer " + SHOP),))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "key 'shop'" in e.value.details() and "needs role 'internal'" in e.value.details()
            assert await _code(fb.LogServed(feedback_pb2.LogServedRequest(),
                                            metadata=(("authorization", "Bearer " + GATEWAY),))) == grpc.StatusCode.OK
            assert await _code(rec.Recommend(req, metadata=(("authorization", "Bearer " + GATEWAY),))) == \
                grpc.StatusCode.PERMISSION_DENIED
            for call in (rec.Recommend(req, metadata=(("authorization", "Bearer " + ADMIN_KEY),)),
                         fb.LogServed(feedback_pb2.LogServedRequest(), metadata=(("authorization", "Bearer " + ADMIN_KEY),))):
                assert await _code(call) == grpc.StatusCode.OK
            # Health stays open (orchestrators probe it without a key).
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(run())


def test_rotation_needs_no_restart_and_a_broken_file_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = _keys(tmp_path / "keys")
    store = KeyStore(path)
    assert store.lookup(SHOP).name == "shop"
    rotated = new_key()
    time.sleep(1.05)
    path.write_text(key_line("shop", ["recommend"], rotated) + "\n")  # the old shop key is revoked
    assert store.lookup(SHOP) is None and store.lookup(rotated).roles == {"recommend"}
    time.sleep(1.05)
    path.write_text("shop recommend not-a-hash\n")
    assert store.lookup(rotated) is not None  # the broken file is not applied


def test_key_file_errors_name_the_line() -> None:
    with pytest.raises(KeyFileError, match="keys line 2: unknown roles"):
        parse_keys(f"a recommend {hash_key('x')}\nb superuser {hash_key('y')}", "keys")
    with pytest.raises(KeyFileError, match="line 1: expected"):
        parse_keys("just-a-name", "keys")
    with pytest.raises(KeyFileError, match="SHA-256"):
        parse_keys("a recommend 1234", "keys")


def test_keys_from_the_environment_and_open_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_AUTH_KEYS", key_line("shop", ["recommend"], SHOP) + ";" + key_line("gw", ["internal"], GATEWAY))
    store = KeyStore.from_settings(None)
    assert store is not None and len(store) == 2
    assert check(store, "/grpc.health.v1.Health/Check", None) is None
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert check(store, reflection, None)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert check(store, reflection, None, reflection_open=True) is None
    # An unknown method needs admin.
    assert check(store, "/recsys.v1.FeedbackService/EraseUser", (("authorization", "Bearer " + SHOP),))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    monkeypatch.delenv("RECSYS_AUTH_KEYS")
    assert KeyStore.from_settings(None) is None  # nothing configured: auth is off


def test_clients_send_their_key_on_every_kind_of_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rpc.clients: the typed clients (their .stub too), channel() and aio_channel() send the key;
    None means $RECSYS_API_KEY, "" means none; server_auth turns auth on only with keys."""
    import logging

    from rpc.auth import server_auth
    from rpc.clients import AsyncRecommendClient, RecommendClient, aio_channel, channel

    store = KeyStore(_keys(tmp_path / "keys"))
    monkeypatch.delenv("RECSYS_AUTH_KEYS", raising=False)
    assert server_auth(None, reflection_open=False, service="t", keys_setting="RECSYS_AUTH_KEYS_FILE") == []
    assert len(server_auth(tmp_path / "keys", reflection_open=False, service="t", keys_setting="X")) == 1

    async def go() -> None:
        server = grpc.aio.server(interceptors=[Authenticate(store)])
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(Recommend(), server)
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        req = recommend_pb2.RecommendRequest()
        try:
            async with AsyncRecommendClient(target, api_key=SHOP) as c:
                assert (await c.recommend()).request_id == "shop"
                assert (await c.stub.Recommend(req, timeout=5)).request_id == "shop"
            async with aio_channel(target, api_key=ADMIN_KEY) as ch:
                assert (await recommend_pb2_grpc.RecommendServiceStub(ch).Recommend(req, timeout=5)).request_id == "ops"
            monkeypatch.setenv("RECSYS_API_KEY", GATEWAY)
            async with aio_channel(target) as ch:  # $RECSYS_API_KEY: the gateway's key, no recommend role
                code = await _code(recommend_pb2_grpc.RecommendServiceStub(ch).Recommend(req, timeout=5))
                assert code == grpc.StatusCode.PERMISSION_DENIED
            async with aio_channel(target, api_key="") as ch:
                code = await _code(recommend_pb2_grpc.RecommendServiceStub(ch).Recommend(req, timeout=5))
                assert code == grpc.StatusCode.UNAUTHENTICATED

            def sync_calls() -> None:
                with RecommendClient(target, api_key=SHOP) as c:
                    assert c.recommend().request_id == "shop" == c.stub.Recommend(req, timeout=5).request_id
                with channel(target, api_key=ADMIN_KEY) as ch:
                    assert recommend_pb2_grpc.RecommendServiceStub(ch).Recommend(req, timeout=5).request_id == "ops"

            await asyncio.to_thread(sync_calls)
        finally:
            await server.stop(0)

    logging.getLogger("rpc.auth").setLevel(logging.INFO)
    asyncio.run(go())
