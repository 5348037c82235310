"""Anvil-style limits per client and the state store they (and AUTH's
failure counts) live in (docs/behaviour/limits.md).

windows.py  the counting algorithm (fixed windows), pure, injected clock
local.py    the in-process store (bounded tables), the default
redis.py    the Redis store (one Lua script per check), falling back to local
store.py    --state: which store
anvil.py    which limit applies to which client, and the checks the server runs
"""
