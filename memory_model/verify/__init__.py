"""Verification of the handoff protocol and measurement of the hardware: the exhaustive
checker (`kvrelay check-protocol`), the GPU litmus tests (`kvrelay litmus`) and the handoff
benchmark (`kvrelay bench handoff`). Not runtime code: no serving path imports it."""
