"""specdec: distributed speculative decoding.

The core (`specdec.core`) is plain PyTorch + transformers; the gRPC tiers, the Redis state
and the CLI are thin adapters around it.
"""

__version__ = "0.1.0"
