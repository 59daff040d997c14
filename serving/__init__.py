"""The gRPC service, package jaxinfer.v1: proto in serving/proto, generated stubs in
serving/gen (scripts/make_grpc_stubs.py), server, client, health, metrics."""
