"""The built-in demo application, served when ``tether serve`` names none (protocol §4).

It is also the fixed target of black-box tests, so names, arguments, results and error codes
follow the contract table exactly:

=====================  ========  ========================  ====================================
function               kind      args                      result
=====================  ========  ========================  ====================================
``whoami``             query     ``{}``                    ``{"userId"}``, ``null`` if anonymous
``messages.list``      query     ``{"channel"}``           last 100 messages, oldest first
``messages.send``      mutation  ``{"channel", "body"}``   the new message's id
``notes.mine``         query     ``{}``                    the caller's notes, oldest first
``notes.add``          mutation  ``{"text"}``              the new note's id
``counter.get``        query     ``{"name"}``              the value, 0 if never incremented
``counter.increment``  mutation  ``{"name", "by"?}``       the new value (``by`` defaults to 1)
=====================  ========  ========================  ====================================

A message is ``{"id", "channel", "body", "author", "createdAt"}``; a note is ``{"id", "text"}``.

Errors: ``unauthenticated`` (anonymous caller) for ``messages.send``, ``notes.mine`` and
``notes.add``; ``invalid`` for an empty ``messages.send`` body or one over 4000 characters. Both are
checked before any data is touched.

Data-layer interface
--------------------
Everything but ``whoami`` reads and writes through ``ctx.db``: a
:class:`tether.server.data.store.QueryDB` in a query, a :class:`tether.server.data.store.MutationDB`
in a mutation (the server always runs one). The interface they use::

    await db.insert(table: str, doc: dict) -> str                  # the new document's id
    await db.get(table: str, id: str) -> dict | None
    await db.patch(table: str, id: str, fields: dict) -> None      # shallow merge of fields
    await db.replace(table: str, id: str, doc: dict) -> None       # (not used by the demo)
    await db.delete(table: str, id: str) -> None                   # (not used by the demo)
    await db.query(table: str, *, index: str, equals: dict,
                   order: "asc" | "desc" = "asc", limit: int | None = None) -> list[dict]

* Documents read back carry their stored fields plus ``"_id"`` (the id ``insert`` returned) and
  ``"_creationTime"`` (milliseconds since the Unix epoch, from the data layer's clock: the demo
  never reads a clock itself).
* ``query`` returns the documents of ``table`` whose index fields equal ``equals``, in creation
  order (``"asc"``: oldest first), at most ``limit`` of them.
* A mutation's reads and writes form one serialisable transaction (``counter.increment`` reads,
  then writes); a query reads one consistent snapshot.

Tables and the indexes the demo declares (``app.table``):

============  ==============  ===========================================
table         index           fields: stored ``{...}``, indexed on
============  ==============  ===========================================
``messages``  ``by_channel``  ``{channel, body, author}``, on ``channel``
``notes``     ``by_owner``    ``{owner, text}``, on ``owner``
``counters``  ``by_name``     ``{name, value}``, on ``name``
============  ==============  ===========================================
"""

from __future__ import annotations

from typing import Any

from tether.protocol import FunctionErrorCode
from tether.server.data.functions import App, Context
from tether.server.errors import FunctionError

app = App("demo")
app.table("messages", indexes={"by_channel": ["channel"]})
app.table("notes", indexes={"by_owner": ["owner"]})
app.table("counters", indexes={"by_name": ["name"]})

#: Longest ``messages.send`` body, in characters (code points).
MAX_MESSAGE_CHARS = 4000
#: Messages ``messages.list`` returns: the channel's most recent ones.
MESSAGES_LISTED = 100


@app.query("whoami")
async def whoami(ctx: Context) -> dict[str, str] | None:
    """The caller's ``{"userId"}``, or ``None`` when anonymous."""
    auth = ctx.auth
    return None if auth is None else {"userId": auth.user_id}


@app.query("messages.list")
async def list_messages(ctx: Context, channel: str) -> list[dict[str, Any]]:
    """The channel's last 100 messages, oldest first."""
    newest = await ctx.db.query(
        "messages",
        index="by_channel",
        equals={"channel": channel},
        order="desc",
        limit=MESSAGES_LISTED,
    )
    return [
        {
            "id": doc["_id"],
            "channel": doc["channel"],
            "body": doc["body"],
            "author": doc["author"],
            "createdAt": doc["_creationTime"],
        }
        for doc in reversed(newest)
    ]


@app.mutation("messages.send")
async def send_message(ctx: Context, channel: str, body: str) -> str:
    """Post ``body`` to ``channel`` as the caller; the new message's id."""
    auth = ctx.require_auth()
    if not body:
        raise FunctionError(FunctionErrorCode.INVALID, "the message body is empty")
    if len(body) > MAX_MESSAGE_CHARS:
        raise FunctionError(
            FunctionErrorCode.INVALID,
            f"the message body is over {MAX_MESSAGE_CHARS} characters",
        )
    message_id: str = await ctx.db.insert(
        "messages", {"channel": channel, "body": body, "author": auth.user_id}
    )
    return message_id


@app.query("notes.mine")
async def my_notes(ctx: Context) -> list[dict[str, Any]]:
    """The caller's notes, oldest first."""
    auth = ctx.require_auth()
    docs = await ctx.db.query(
        "notes", index="by_owner", equals={"owner": auth.user_id}, order="asc"
    )
    return [{"id": doc["_id"], "text": doc["text"]} for doc in docs]


@app.mutation("notes.add")
async def add_note(ctx: Context, text: str) -> str:
    """Add a note owned by the caller; the new note's id."""
    auth = ctx.require_auth()
    note_id: str = await ctx.db.insert("notes", {"owner": auth.user_id, "text": text})
    return note_id


async def _counter(db: Any, name: str) -> dict[str, Any] | None:
    docs = await db.query("counters", index="by_name", equals={"name": name}, limit=1)
    return docs[0] if docs else None


@app.query("counter.get")
async def get_counter(ctx: Context, name: str) -> int:
    """The counter's value, 0 if it was never incremented."""
    doc = await _counter(ctx.db, name)
    return 0 if doc is None else int(doc["value"])


@app.mutation("counter.increment")
async def increment_counter(ctx: Context, name: str, by: int = 1) -> int:
    """Add ``by`` to the counter (created at 0); the new value."""
    db = ctx.db
    doc = await _counter(db, name)
    if doc is None:
        await db.insert("counters", {"name": name, "value": by})
        return by
    value = int(doc["value"]) + by
    await db.patch("counters", doc["_id"], {"value": value})
    return value
