"""gRPC plumbing shared by the tiers: conversions, error mapping, server bootstrap,
multiplexed bidirectional streams."""
