"""The gRPC service (jaxinfer.v1): not built yet; see the serving issue."""
