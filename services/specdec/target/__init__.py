"""The target tier: batched verification over gRPC."""
