"""The draft tier: n-gram and draft-model proposals over gRPC."""
