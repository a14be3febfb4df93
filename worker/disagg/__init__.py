"""Disaggregated prefill/decode serving, worker side: the KV handoff receiver."""
