"""The gRPC router and the Ray worker pool (serving issue: not built yet)."""
