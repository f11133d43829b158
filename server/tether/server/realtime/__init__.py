"""The ``/sync`` realtime connection: the sans-I/O per-connection state machine
(:mod:`~tether.server.realtime.core`), the socket shell that carries out its actions
(:mod:`~tether.server.realtime.endpoint`), the shared deadline queue
(:mod:`~tether.server.realtime.timers`) and the session hub that tells live sockets their session
ended (:mod:`~tether.server.realtime.session_hub`).

It uses :mod:`tether.server.auth` (to verify and refresh identities) and
:mod:`tether.server.data` (to run functions and live queries); neither uses it.
"""
