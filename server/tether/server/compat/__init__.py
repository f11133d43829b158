"""Private internals of Tether's dependencies, quarantined: one module per dependency.

Where Tether cannot do without an attribute or hook that a dependency does not document
(uvicorn's transport behind an ASGI ``send``, redis-py's per-node command hook, asyncio's
future-blocking flag on Python 3.11), it reaches it here and nowhere else, so that an upgrade
that changes it breaks one module. ``tests/test_compat.py`` checks each one against the
installed version of its dependency and names what changed when it fails.

| module | dependency | internal |
| --- | --- | --- |
| :mod:`.uvicorn` | uvicorn | ``send.__self__.transport`` (the socket behind ``send``) |
| :mod:`.redis` | redis-py | ``RedisCluster._execute_command``, ``.commands_parser``, |
| | | ``.nodes_manager.initialize(last_failed_node_name=)`` |
| :mod:`.asyncio` | CPython 3.11 | ``Future._asyncio_future_blocking`` (3.12+: eager tasks) |
"""
