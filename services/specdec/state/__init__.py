"""Shared state in Redis: the replica registry and session records. Optional: without a
Redis URL everything works from memory and static addresses."""
