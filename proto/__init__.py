"""The public gRPC API, ``kvrelay.v1`` (serving issue: stubs not generated yet)."""
