"""Disaggregated prefill/decode serving, worker side: the decode worker's handoff receiver
(`receiver.py`) and the prefill worker's KV export (`export.py`)."""
