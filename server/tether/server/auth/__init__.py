"""Authentication: users and passwords, sessions and refresh-token rotation (atomic in Redis),
access tokens and their signing keys, rate limits, and the HTTP auth API.

Transport-neutral at its core: :class:`~tether.server.auth.service.AuthService` raises
:class:`~tether.server.auth.errors.AuthFailure` with the contract's code; the HTTP routes
(:mod:`~tether.server.auth.http`) map it to a status and the ``/sync`` socket
(:mod:`tether.server.realtime`) to an ``auth_error`` code. Its Lua scripts are in
``lua/`` beside these modules.
"""
