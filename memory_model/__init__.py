"""Cross-GPU release/acquire signaling for KV block handoff (memory_model issue: not built yet)."""
