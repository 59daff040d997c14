"""The gRPC contract: committed stubs are what the .proto generates, and the
server describes itself through reflection."""

import filecmp
import importlib.util
import pathlib

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from engine_fixtures import tiny_llm
from serving.server import Server

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_stubs_are_what_the_proto_generates(tmp_path):
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("make_grpc_stubs", ROOT / "scripts" / "make_grpc_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tmp_path) == 0
    committed = ROOT / "serving" / "gen" / "jaxinfer" / "v1"
    for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "jaxinfer" / "v1" / name, committed / name, shallow=False), \
            f"{name} is stale: run python scripts/make_grpc_stubs.py"


def test_the_server_lists_its_services_through_reflection(data_dir):
    srv = Server(tiny_llm(data_dir, warmup=False).engine, warmup=False)
    srv.start()
    try:
        db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(f"127.0.0.1:{srv.port}"))
        services = set(db.get_services())
        assert {"jaxinfer.v1.Inference", "grpc.health.v1.Health"} <= services
        generate = db.FindFileContainingSymbol("jaxinfer.v1.Inference")
        assert "jaxinfer/v1/inference.proto" in generate.name
    finally:
        srv.drain(10)
