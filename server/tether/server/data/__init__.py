"""The data layer: an application's functions and tables (:mod:`~tether.server.data.functions`,
the API application code imports), running them (:mod:`~tether.server.data.engine`), documents
and commits in Redis (:mod:`~tether.server.data.store`, scripts in ``lua/``), and live queries
(:mod:`~tether.server.data.live`).

It knows nothing of sockets or of the wire protocol: :mod:`tether.server.realtime` delivers
what it computes.
"""
