"""Disaggregated prefill/decode serving, worker side: the role object the engine calls at its seams
(`role.py`), the decode worker's handoff receiver (`receiver.py`), the prefill worker's KV export
(`export.py`), and the handoff verbs of the engine loop and the actor (`verbs.py`)."""
