"""The speculative-decoding core: sampling, rejection sampling, KV caches, model runners,
drafters and the speculation loop. Imports no gRPC, Redis or Kubernetes code."""
