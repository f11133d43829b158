"""The Tether server: an ASGI application (:func:`tether.server.app.create_app`) and the
``tether`` command (:mod:`tether.server.cli`).

Four subsystems, each a package, with dependencies that run one way (checked by
``import-linter`` in ``make lint``; see ``docs/architecture.md``)::

    realtime   the /sync socket: sans-I/O core, socket shell, timers, session hub
      │  ╲
      ▼   ▼
    auth   data    auth: users, sessions, tokens, keys    data: functions, store, live queries
      ╲   ╱
       ▼ ▼
      redis        connection, key layout, embedded redis-server

Beside them: :mod:`~tether.server.settings`, :mod:`~tether.server.errors` (the server's
exceptions), :mod:`~tether.server.clock`, :mod:`~tether.server.app` (wires the subsystems) and
:mod:`~tether.server.demo` (the contract's demo application).
"""
