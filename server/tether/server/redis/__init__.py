"""Redis: connecting (standalone or Cluster) and running Lua scripts
(:mod:`~tether.server.redis.connection`), every key and channel Tether uses
(:mod:`~tether.server.redis.keys`), and the embedded ``redis-server`` of a single-machine
deployment (:mod:`~tether.server.redis.embedded`). It imports no other part of Tether.
"""
