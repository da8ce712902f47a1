"""Generate docs/api.md from the docstrings of aioti's public names.

    python docs/make_api.py          # rewrite docs/api.md
tests/test_docs.py fails when the file differs from what this script would write, or when a
public name has no docstring.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import aioti

OUT = Path(__file__).with_name("api.md")


def public_members(obj: object) -> list[tuple[str, object]]:
    out = []
    for name, member in vars(obj).items():
        if name.startswith("_") and name not in ("__call__",):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            out.append((name, member))
    return out


def entries() -> list[tuple[str, str, str]]:
    """(qualified name, signature, docstring) for every public name and method."""
    rows = []
    for name in sorted(aioti.__all__):
        obj = getattr(aioti, name)
        sig = ""
        if callable(obj) and not isinstance(obj, type):
            sig = str(inspect.signature(obj))
        rows.append((f"aioti.{name}", sig, inspect.getdoc(obj) or ""))
        if isinstance(obj, type) and not issubclass(obj, BaseException):
            for mname, member in public_members(obj):
                fn = member.fget if isinstance(member, property) else member
                msig = "" if isinstance(member, property) else str(inspect.signature(fn))
                rows.append((f"aioti.{name}.{mname}", msig, inspect.getdoc(fn) or ""))
    return rows


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/make_api.py`; a test keeps it current.",
             ""]
    for qual, sig, doc in entries():
        lines += [f"### `{qual}{sig}`", "", doc or "(no docstring)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
