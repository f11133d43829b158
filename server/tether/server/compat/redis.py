"""redis-py: the asyncio cluster client's undocumented parts that Tether builds on.

- :class:`NodeHookedCluster`: every command a cluster client sends to one node (again for each
  retry after a connection error) passes through ``RedisCluster._execute_command(target_node,
  ...)``; overriding it is the one way to wrap each node's commands (Tether bounds them per
  node).
- :func:`closed_under_use`: redis-py 8.1's asyncio connection raises ``AttributeError``
  (``'NoneType' object has no attribute 'writelines'``) when it is closed while a command is
  being sent on it — the cluster client closes a node's connections when it reloads its slot
  map during a failover — instead of a ``ConnectionError``, which the cluster client would retry.
  :class:`NodeHookedCluster` turns it into one.
- :func:`node_of_command`: which node serves a command's first key, with the client's own
  command parser (``commands_parser``), as the client itself routes it.
- :func:`reload_layout`: re-read the slot map with a named node asked last, through
  ``nodes_manager.initialize(last_failed_node_name=...)`` (the public ``initialize()`` does
  nothing once the map is loaded).
- :func:`cancel_safe`: redis-py 8.1 writes each command inside ``asyncio.wait_for``, which on
  Python 3.11 can swallow the caller's cancellation (the write finished in the same turn as
  the ``cancel()``: ``wait_for`` returns the result, the ``CancelledError`` is lost). A task
  cancelled during a Redis call then went on running: a background loop cancelled at shutdown
  never ended, and the process hung until it was killed. The connection classes it returns
  write under ``asyncio.timeout`` instead, which re-raises the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_CONNECTION_MODULE = os.path.join("redis", "asyncio", "connection.py")


def closed_under_use(exc: BaseException) -> bool:
    """Is ``exc`` redis-py's ``AttributeError`` from a connection closed while in use (its
    reader or writer gone), rather than a bug of ours? Told by where it was raised."""
    if not isinstance(exc, AttributeError) or "'NoneType' object" not in str(exc):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.endswith(_CONNECTION_MODULE)


class NodeHookedCluster(RedisCluster):
    """A :class:`~redis.asyncio.RedisCluster` whose every command to a node runs inside
    :meth:`around_node`, a hook for subclasses."""

    def around_node(self, node_name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered around each attempt of a command sent to the node named ``node_name`` (a
        retry after a connection error enters it again; a ``MOVED`` or ``ASK`` redirect is
        followed inside it). What it raises, the command raises. Does nothing here."""
        return contextlib.nullcontext()

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        async with self.around_node(target_node.name):
            # A connection error, so that the cluster client retries the command (it retries
            # exactly redis.exceptions.ConnectionError, not subclasses).
            with closed_as_connection_error(target_node.name):
                return await super()._execute_command(target_node, *args, **kwargs)


@contextlib.contextmanager
def closed_as_connection_error(node_name: str) -> Iterator[None]:
    """Turns :func:`closed_under_use` into the ``ConnectionError`` it stands for, inside the
    block (a cluster pipeline, which reaches its nodes without :meth:`NodeHookedCluster.
    _execute_command`)."""
    try:
        yield
    except AttributeError as exc:
        if not closed_under_use(exc):
            raise
        raise RedisConnectionError(f"a connection to {node_name} was closed while in use") from exc


async def node_of_command(client: RedisCluster, args: tuple[Any, ...]) -> str | None:
    """The name of the node that serves the first key of command ``args`` (for example
    ``("GET", "k")``), or None for a command without keys. Loads the slot map on first use."""
    await client.initialize()  # a no-op once the map is loaded
    keys = await client.commands_parser.get_keys(*args)
    if not keys:
        return None
    node = client.get_node_from_key(keys[0])
    return None if node is None else str(node.name)


async def reload_layout(client: RedisCluster, last_failed_node: str | None) -> None:
    """Re-read the cluster's slot map from the nodes ``client`` knows, ``last_failed_node`` (a
    node name) asked last. Raises ``RedisClusterException`` when no node answers."""
    await client.nodes_manager.initialize(last_failed_node_name=last_failed_node)


class _CancelSafeWrites(AbstractConnection):
    """redis-py's ``send_packed_command`` with its write timeout under ``asyncio.timeout``
    instead of ``asyncio.wait_for``: the same errors, the same disconnects, and a cancellation
    that always reaches the caller. (``wait_for`` also ran every write as a task of its own.)"""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        if not timeout:  # redis-py writes without wait_for then
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(timeout):
                # redis-py's own write: a connection closed under it raises its AttributeError
                # from redis-py's module, as closed_under_use expects.
                await self._send_packed_command(command)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            number, message = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
            raise RedisConnectionError(
                f"Error {number} while writing to socket. {message}."
            ) from exc
        except BaseException:
            # Part of the command may be written: the connection cannot serve anyone else.
            await self.disconnect(nowait=True)
            raise


#: The classes :func:`cancel_safe` made, by the class each extends.
_CANCEL_SAFE: dict[type[Any], type[Any]] = {}


def cancel_safe(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` (redis-py's ``Connection``, ``SSLConnection``, ...) writing as
    :class:`_CancelSafeWrites` does. The same class for the same argument."""
    if issubclass(connection_class, _CancelSafeWrites):
        return connection_class
    made = _CANCEL_SAFE.get(connection_class)
    if made is None:
        name = f"CancelSafe{connection_class.__name__}"
        made = _CANCEL_SAFE[connection_class] = type(
            name, (_CancelSafeWrites, connection_class), {}
        )
    return made


def cancel_safe_cluster(client: RedisCluster) -> None:
    """Have the nodes of ``client`` (just built, nothing connected yet) connect with
    :func:`cancel_safe` connection classes: those it knows now and those it learns later
    (built from the client's ``connection_kwargs``)."""
    kwargs = client.connection_kwargs
    kwargs["connection_class"] = cancel_safe(kwargs["connection_class"])
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = cancel_safe(node.connection_class)
