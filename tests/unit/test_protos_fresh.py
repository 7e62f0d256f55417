"""The committed gRPC code must be what `make protos` generates from protos/ now."""

from __future__ import annotations

from pathlib import Path

from scripts.gen_protos import PROTO_ROOT, generate, proto_files


def test_generated_code_is_fresh(tmp_path: Path):
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    # _pb2.py, _pb2_grpc.py and their mypy-protobuf stubs _pb2.pyi, _pb2_grpc.pyi, each
    assert len(generated) == 4 * len(proto_files())
    assert all("mypy-protobuf" in (tmp_path / rel).read_text() for rel in generated if rel.suffix == ".pyi")
    stale = [str(rel) for rel in generated if (PROTO_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stale generated code, run `make protos`: {stale}"


def test_services_and_fields_are_importable():
    from recsys.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc, recommend_pb2, recommend_pb2_grpc

    assert set(recommend_pb2.DESCRIPTOR.services_by_name) == {"RecommendService"}
    methods = recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].methods_by_name
    assert set(methods) == {"Recommend", "Rank"}
    stream = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].methods_by_name["Stream"]
    assert stream.client_streaming and not stream.server_streaming
    assert [v.name for v in feedback_pb2.EventType.DESCRIPTOR.values] == [
        "EVENT_TYPE_UNSPECIFIED", "EVENT_TYPE_IMPRESSION", "EVENT_TYPE_CLICK", "EVENT_TYPE_ADD_TO_CART",
        "EVENT_TYPE_PURCHASE", "EVENT_TYPE_QUERY",
    ]
    resp = recommend_pb2.RecommendResponse(request_id="r1", degraded=True, model_versions={"ranker": "3"})
    resp.items.add(item_id="i1", score=0.5, rank=1, reasons=["matches 'shoes'"],
                   breakdown=common_pb2.ScoreBreakdown(relevance=0.4, popularity=0.1))
    again = recommend_pb2.RecommendResponse.FromString(resp.SerializeToString())
    assert again == resp
    assert hasattr(recommend_pb2_grpc, "RecommendServiceServicer")
    assert hasattr(feedback_pb2_grpc, "FeedbackServiceStub")


def test_every_field_is_documented():
    """Each field and enum value in the .proto files carries a comment (on its line or the line above)."""
    undocumented = []
    for proto in proto_files():
        lines = proto.read_text().splitlines()
        for n, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "option", "syntax", "package", "import"))
            if is_field and "//" not in s and not lines[n - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{n + 1}: {s}")
    assert not undocumented, undocumented
