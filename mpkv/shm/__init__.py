"""Shared-memory building blocks: segments, signals, rings, barriers, the registry. No actor logic here."""
