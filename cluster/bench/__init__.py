"""Load-test harness of a running server (`kvrelay bench serve|router|disagg`); not runtime code."""
