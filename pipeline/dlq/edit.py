"""Correcting a dead letter: the payload in JSON form, changed by ``--set path=value`` or a JSON
merge patch (RFC 7386), validated against the event type's schema, encoded, and appended to the
DLQ as a new record linked to the original (``erp_dlq_edit_of``). The original stays untouched;
a replay sends the latest correction in the original's place."""

from __future__ import annotations

import re
import time
from typing import Any

from pipeline import exactjson
from pipeline.dlq.records import DlqRecord
from pipeline.errors import PipelineError, UsageError
from pipeline.kafka.names import EDIT_OF, EDITED_AT, EDITED_BY
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.schemas.jsonform import to_json_form

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


_PATH = re.compile(r"[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*")


def _steps(path: str) -> list[str | int]:
    if not _PATH.fullmatch(path):
        raise UsageError(f"bad --set path {path!r}: use field.sub[0].name")
    steps: list[str | int] = []
    pos = 0
    for m in _STEP.finditer(path):
        if m.start() != pos and path[pos:m.start()] != ".":
            raise UsageError(f"bad --set path {path!r}: use field.sub[0].name")
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not steps or pos != len(path):
        raise UsageError(f"bad --set path {path!r}: use field.sub[0].name")
    return steps


def set_path(doc: dict[str, Any], assignment: str) -> None:
    """``lines[0].qty=3``: the value is JSON when it parses as JSON, else a string."""
    path, sep, text = assignment.partition("=")
    if not sep:
        raise UsageError(f"bad --set {assignment!r}: give path=value, e.g. lines[0].qty=3")
    try:
        value: Any = exactjson.loads(text)  # 12.50 stays 12.50, not a binary float
    except exactjson.JsonError:
        value = text
    steps = _steps(path.strip())
    node: Any = doc
    for i, step in enumerate(steps[:-1]):
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            where = path.split("=")[0]
            raise UsageError(
                f"--set {where}: the payload has no {'.'.join(map(str, steps[: i + 1]))}"
            ) from None
    last = steps[-1]
    if isinstance(node, list) and isinstance(last, int):
        if last >= len(node):
            raise UsageError(f"--set {path}: index {last} is past the end ({len(node)} items)")
        node[last] = value
    elif isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    else:
        raise UsageError(f"--set {path}: cannot set {last!r} on a {type(node).__name__}")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def corrected(r: DlqRecord, decoder: Decoder, encoder: Encoder, *, sets: list[str],
              patch: Any | None, by: str) -> tuple[bytes, list[tuple[str, bytes]], Any]:
    """(value, headers, new payload in JSON form) of the corrected copy; raises UsageError
    with the schema's message (naming the field) when the result does not validate."""
    if r.edit_of is not None:
        raise UsageError(
            f"{r.position} is itself a correction of {r.edit_of}: edit the original "
            f"({r.edit_of}) instead"
        )
    if r.outbox_row is not None:
        return _corrected_row(r, encoder, sets=sets, patch=patch, by=by)
    try:
        decoded = decoder.decode(r.value)
    except PipelineError as exc:
        raise UsageError(
            f"cannot edit {r.position}: its payload cannot be decoded ({exc}); such a record "
            "can only be exported and re-published by hand"
        ) from exc
    doc = to_json_form(decoded.value)
    if patch is not None:
        doc = merge_patch(doc, patch)
    for s in sets:
        set_path(doc, s)
    try:
        encoded = encoder.encode(decoded.event_type, doc, topic=r.original_topic or r.topic)
    except PipelineError as exc:
        raise UsageError(
            f"the corrected {decoded.event_type} does not match its schema: {exc}; nothing "
            "was written"
        ) from exc
    headers = [(k, v) for k, v in r.headers.items() if k not in (EDIT_OF, EDITED_BY, EDITED_AT)]
    headers += [
        (EDIT_OF, str(r.position).encode()),
        (EDITED_BY, by.encode()),
        (EDITED_AT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()),
    ]
    return encoded.value, headers, doc


def _corrected_row(r: DlqRecord, encoder: Encoder, *, sets: list[str], patch: Any | None,
                   by: str) -> tuple[bytes, list[tuple[str, bytes]], Any]:
    """An outbox row the relay dead-lettered: its payload corrected (numbers exact), validated
    as the relay would encode it; the copy holds the row as JSON again."""
    if not r.value:
        raise UsageError(f"cannot edit {r.position}: the row is in the claim-check store")
    try:
        row = exactjson.loads(r.value)
    except exactjson.JsonError as exc:
        raise UsageError(f"cannot edit {r.position}: the stored row is not JSON ({exc})") from exc
    doc = row.get("payload")
    if patch is not None:
        doc = merge_patch(doc, patch)
    for s in sets:
        set_path(doc, s)
    try:
        encoder.validate(str(row.get("event_type")), doc, row.get("headers") or {})
    except PipelineError as exc:
        raise UsageError(
            f"the corrected {row.get('event_type')} does not match its schema: {exc}; nothing "
            "was written"
        ) from exc
    row["payload"] = doc
    headers = [(k, v) for k, v in r.headers.items() if k not in (EDIT_OF, EDITED_BY, EDITED_AT)]
    headers += [
        (EDIT_OF, str(r.position).encode()),
        (EDITED_BY, by.encode()),
        (EDITED_AT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()),
    ]
    return exactjson.dumps(row).encode(), headers, doc
