"""A complete small Tether application: shared to-do lists.

Run it with ``tether serve examples.todos:app`` from the repository root.
"""

from __future__ import annotations

from typing import Any

from tether import App, Context, FunctionError

app = App("todos")
app.table("todos", indexes={"by_list": ["list"], "by_list_done": ["list", "done"]})


@app.query("todos.list")
async def list_todos(ctx: Context, list: str, only_open: bool = False) -> list[dict[str, Any]]:
    """The list's items, oldest first (only the open ones with ``only_open``)."""
    if only_open:
        docs = await ctx.db.query(
            "todos", index="by_list_done", equals={"list": list, "done": False}
        )
    else:
        docs = await ctx.db.query("todos", index="by_list", equals={"list": list})
    return [{"id": d["_id"], "text": d["text"], "done": d["done"], "by": d["by"]} for d in docs]


@app.mutation("todos.add")
async def add_todo(ctx: Context, list: str, text: str) -> str:
    """Add an item as the signed-in user; its id."""
    auth = ctx.require_auth()
    if not text.strip():
        raise FunctionError("invalid", "an item needs some text")
    todo_id: str = await ctx.db.insert(
        "todos", {"list": list, "text": text.strip(), "done": False, "by": auth.user_id}
    )
    return todo_id


@app.mutation("todos.toggle")
async def toggle_todo(ctx: Context, id: str) -> bool:
    """Flip an item's ``done``; the new value. Anyone signed in may tick any item."""
    ctx.require_auth()
    doc = await ctx.db.get("todos", id)
    if doc is None:
        raise FunctionError("not_found", "no such item")
    done = not doc["done"]
    await ctx.db.patch("todos", id, {"done": done})
    return done
