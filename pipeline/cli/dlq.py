"""``pipeline dlq …``: inspect, explain, edit and replay dead-lettered events."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.cli import Context, pass_ctx
from pipeline.kafka import names
from pipeline.kafka.forward import Forwarder

F = TypeVar("F", bound=Callable[..., Any])
CONFIRM_ABOVE = 100


def _filters(fn: F) -> F:
    for opt in reversed([
        click.option("--group", "-g", help="consumer group (worker name); default: every group"),
        click.option("--topic", help="original topic, e.g. erp.order"),
        click.option("--type", "event_type", help="event type, e.g. order.created"),
        click.option("--key", help="record key (aggregate id)"),
        click.option("--error", help="error class, e.g. TargetRefused (or its full name)"),
        click.option("--since", help="dead-lettered at or after: 30m, 2h, 7d or ISO time"),
        click.option("--until", help="dead-lettered at or before: 30m, 2h, 7d or ISO time"),
        click.option("--header", "headers", multiple=True, help="name=value (repeatable)"),
        click.option("--limit", type=click.IntRange(min=1), help="at most N records"),
    ]):
        fn = opt(fn)
    return fn


def _select(ctx: Context, kw: dict[str, Any], *, keep_all: bool = False,
            pick: Callable[[Any, Any, int | None], list[Any]] | None = None
            ) -> list[tuple[Any, list[Any]]]:
    """(group DLQ, its selected records) per group; ``keep_all``: the group's other records
    are kept too (``records()``), for a replay's plan. ``pick(dlq, filter, limit)`` takes
    what is kept of a group's selection instead of its records (``ls``: its lines' cells)."""
    from pipeline.dlq.records import Filter, FilterError
    from pipeline.dlq.store import iter_groups
    from pipeline.errors import UsageError

    try:
        flt = Filter.build(topic=kw["topic"], event_type=kw["event_type"], key=kw["key"],
                           error=kw["error"], since=kw["since"], until=kw["until"],
                           header=kw["headers"])
    except FilterError as exc:
        raise UsageError(str(exc)) from None
    out = []
    left = kw["limit"]
    for dlq in iter_groups(ctx.settings, kw["group"]):
        if keep_all:
            dlq.records()
        picked = dlq.select(flt, left) if pick is None else pick(dlq, flt, left)
        out.append((dlq, picked))
        if left is not None:
            left -= len(picked)
            if left <= 0:
                break
    return out


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=None, default=str))


@click.group("dlq")
def dlq() -> None:
    """Dead-lettered events: ls, show, stats, edit, replay, export."""
    from pipeline import telemetry
    from pipeline.kafka.client import silence_client_logs

    silence_client_logs()
    if telemetry.traces_configured():  # replays continue the events' traces
        telemetry.setup("dlq")


@dlq.command("ls")
@_filters
@click.option("--json", "as_json", is_flag=True, help="a JSON array with stable field names")
@pass_ctx
def ls_cmd(ctx: Context, /, as_json: bool, **kw: Any) -> None:
    """List dead letters: position, age, original position, key, type, attempts, error."""
    from pipeline.dlq.records import layout, summaries

    now = dt.datetime.now(dt.UTC)
    if as_json:
        picked = _select(ctx, kw)
        _echo_json([row for d, rs in picked for row in summaries(rs, now, d.group)])
        return
    # the lines' cells, worked out where the records are read (GroupDlq.listing)
    picked = _select(ctx, kw, pick=lambda d, flt, n: list(zip(*d.listing(flt, now, n),
                                                               strict=True)))
    width = min(shutil.get_terminal_size((80, 24)).columns, 200)
    lines: list[str] = []
    for d, listed in picked:
        if len(picked) > 1 or not listed:
            lines.append(f"# {d.group} ({d.topic}): {len(listed)} record(s)")
        if listed:
            lines += layout([cells for cells, _e in listed], [e for _c, e in listed], width)
    if lines:
        click.echo("\n".join(lines))  # one write: a line per call costs more than the table


@dlq.command("show")
@click.argument("group")
@click.argument("position")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show_cmd(ctx: Context, group: str, position: str, as_json: bool) -> None:
    """Everything about one dead letter: headers, decoded payload, stack trace, the target's
    answer, and the events blocked behind it. POSITION is PARTITION:OFFSET as ls shows it."""
    from pipeline.dlq.store import GroupDlq

    now = dt.datetime.now(dt.UTC)
    d = GroupDlq(ctx.settings, group)
    r = d.get(position)
    payload, decode_error = _payload(_decoder(ctx), r)
    headers = _headers(r)
    blocked = d.blocked_behind(r.event_id)
    data = {"group": group, "topic": d.topic, **r.summary(now), "headers": headers,
            "payload": payload, "payload_error": decode_error,
            "stacktrace": r.header(names.EXCEPTION_STACKTRACE),
            "target_error_body": r.header(names.TARGET_ERROR_BODY),
            "blocked_behind": [str(b.position) for b in blocked]}
    if as_json:
        _echo_json(data)
        return
    click.echo(f"{d.topic} {r.position}  ({r.when.isoformat()}, {data['age_s']}s ago)")
    click.echo(f"event     {r.event_id}  {r.event_type}  key {r.key_text}")
    click.echo(f"original  {r.original}  attempts {r.attempts}")
    click.echo(f"error     {r.error_fqcn}: {r.error_message}")
    if r.edit_of:
        click.echo(f"edit of   {r.edit_of}")
    click.echo("\nheaders:")
    for k, v in headers.items():
        if k not in (names.EXCEPTION_STACKTRACE, names.TARGET_ERROR_BODY):
            click.echo(f"  {k}: {v}")
    click.echo("\npayload:" if payload is not None else f"\npayload: {decode_error}")
    if payload is not None and r.outbox_row is not None:
        from pipeline import exactjson

        click.echo(exactjson.dumps(payload))  # the stored row, every number as written
    elif payload is not None:
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    if data["target_error_body"]:
        click.echo(f"\ntarget answered:\n{data['target_error_body']}")
    if data["stacktrace"]:
        click.echo(f"\nstack trace:\n{data['stacktrace'].rstrip()}")
    click.echo(f"\nblocked behind it (strict ordering): "
               f"{', '.join(data['blocked_behind']) or 'none'}")


def _decoder(ctx: Context) -> Any:
    from pipeline.relay.relay import _registry
    from pipeline.schemas.catalogue import Catalogue
    from pipeline.schemas.codec import Decoder

    return Decoder(Catalogue.load(ctx.settings.schemas.path), _registry(ctx.settings))


def _payload(decoder: Any, r: Any) -> tuple[Any, str | None]:
    """(the payload in JSON form, None) or (None, why it cannot be decoded). An outbox row
    the relay dead-lettered is the stored row as JSON (its payload as written, numbers exact):
    shown as it is."""
    from pipeline import exactjson
    from pipeline.schemas.jsonform import to_json_form

    if r.outbox_row is not None:
        if not r.value:
            return None, "the row is in the claim-check store (too large to travel inline)"
        try:
            return exactjson.loads(r.value), None
        except exactjson.JsonError as exc:
            return None, f"the stored row is not JSON: {exc}"
    try:
        return to_json_form(decoder.decode(r.value).value), None
    except Exception as exc:  # show what is there, whatever it is
        return None, f"{type(exc).__name__}: {exc}"


def _headers(r: Any) -> dict[str, Any]:
    """Headers for people: the binary Spring ones as numbers, other non-text ones in hex."""

    binary = {names.ORIGINAL_PARTITION: r.original_partition,
              names.ORIGINAL_OFFSET: r.original_offset, names.ATTEMPTS: r.attempts}
    return {k: (binary[k] if k in binary else
                v.decode("utf-8", "replace") if _is_text(v) else "0x" + v.hex())
            for k, v in r.headers.items()}


def _is_text(v: bytes) -> bool:
    try:
        text = v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable() or all(c.isprintable() or c in "\n\t\r" for c in text)


@dlq.command("stats")
@click.option("--group", "-g", help="consumer group; default: every group")
@click.option("--by", type=click.Choice(["error", "type", "topic", "hour"]), default="error",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def stats_cmd(ctx: Context, group: str | None, by: str, as_json: bool) -> None:
    """Counts of dead letters per error class, event type, original topic or hour."""
    from pipeline.dlq.records import stats
    from pipeline.dlq.store import iter_groups

    out: list[dict[str, Any]] = []
    for d in iter_groups(ctx.settings, group):
        recs = d.records()
        out.append({"group": d.group, "topic": d.topic, "total": len(recs),
                    "oldest": min((r.when for r in recs), default=None),
                    "newest": max((r.when for r in recs), default=None),
                    "by": by, "groups": stats(recs, by)})
    if as_json:
        _echo_json(out)
        return
    for g in out:
        span = (f", oldest {g['oldest']:%Y-%m-%d %H:%M}Z, newest {g['newest']:%Y-%m-%d %H:%M}Z"
                if g["total"] else "")
        click.echo(f"{g['group']}: {g['total']} dead letter(s){span}")
        for row in g["groups"]:
            click.echo(f"  {row['count']:>7}  {row[by]}")


@dlq.command("replay")
@_filters
@click.option("--dry-run", is_flag=True, help="show what would be sent; send nothing")
@click.option("--rate", help="at most this many per second, e.g. 200/s")
@click.option("--again", is_flag=True, help="also records replayed before")
@click.option("--yes", is_flag=True, help=f"do not ask (asked above {CONFIRM_ABOVE} records)")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def replay_cmd(ctx: Context, /, dry_run: bool, rate: str | None, again: bool, yes: bool,
               as_json: bool, **kw: Any) -> None:
    """Send selected dead letters back to their group's first retry tier (never the shared
    event topic), in key order, with the events blocked behind them, once."""
    from pipeline.dlq import replay as rp
    from pipeline.errors import UsageError

    if not kw["group"]:
        raise UsageError("replay needs --group: the group whose handler will get the events")
    try:
        per_s = rp.parse_rate(rate)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ((d, picked),) = _select(ctx, kw, keep_all=True)
    p = rp.plan(picked, d.records(), d.replayed(), again=again)
    summary = {"group": d.group, "target": d.replay_target, "selected": len(picked),
               "to_send": len(p.send), "followers_added": p.followers_added,
               "already_replayed": len(p.already), "superseded_by_edit": len(p.superseded),
               "dry_run": dry_run}
    if dry_run or not p.send:
        if as_json:
            _echo_json({**summary, "positions": [str(r.position) for r in p.send], "sent": 0})
        else:
            click.echo(f"{len(p.send)} record(s) would be sent to {d.replay_target}"
                       f" ({len(p.already)} already replayed: --again to include them;"
                       f" {p.followers_added} blocked follower(s) added)")
            for r in p.send[:50]:
                click.echo(f"  {r.position}  {r.key_text}  {r.event_type}  {r.event_id}")
        return
    if len(p.send) > CONFIRM_ABOVE and not yes:
        click.confirm(f"Replay {len(p.send)} records to {d.replay_target}?", abort=True, err=True)
    interactive = sys.stderr.isatty() and not as_json
    if interactive:
        import time

        started, done = time.monotonic(), [0]
        with click.progressbar(length=len(p.send), label=f"replaying to {d.replay_target}",
                               show_eta=True, show_pos=True, file=sys.stderr,
                               item_show_func=lambda rate: rate) as bar:

            def tick(n: int) -> None:
                done[0] += n
                elapsed = max(1e-6, time.monotonic() - started)
                bar.update(n, f"{done[0] / elapsed:.0f}/s")

            result = rp.send(d, p.send, rate=per_s, progress=tick)
    else:
        result = rp.send(d, p.send, rate=per_s)
    out = {**summary, "replay_id": result.replay_id, "sent": result.sent,
           "seconds": round(result.seconds, 3), "rate_per_s": round(result.rate, 1)}
    if as_json:
        _echo_json(out)
    else:
        click.echo(f"replay {result.replay_id}: sent {result.sent} record(s) to "
                   f"{result.target} in {result.seconds:.1f}s ({result.rate:.0f}/s)")


@dlq.command("edit")
@click.argument("group")
@click.argument("position")
@click.option("--set", "sets", multiple=True, help="path=value, e.g. lines[0].qty=3 (repeatable)")
@click.option("--patch", "patch_file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path),
              help="a JSON merge patch (RFC 7386) applied to the payload")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def edit_cmd(ctx: Context, group: str, position: str, sets: tuple[str, ...],
             patch_file: Path | None, as_json: bool) -> None:
    """Write a corrected copy of a dead letter (validated against its schema) next to it in the
    DLQ; a replay sends the correction in the original's place."""
    from confluent_kafka import Producer

    from pipeline.dlq.edit import corrected
    from pipeline.dlq.replay import operator
    from pipeline.dlq.store import GroupDlq
    from pipeline.errors import BrokerUnavailable, UsageError
    from pipeline.kafka.client import producer_config
    from pipeline.relay.relay import _registry
    from pipeline.schemas.catalogue import Catalogue
    from pipeline.schemas.codec import Decoder, Encoder

    if not sets and patch_file is None:
        raise UsageError("edit needs --set path=value or --patch file.json")
    patch = None
    if patch_file is not None:
        try:
            patch = json.loads(patch_file.read_text())
        except ValueError as exc:
            raise UsageError(f"--patch {patch_file}: not JSON ({exc})") from None
    s = ctx.settings
    d = GroupDlq(s, group)
    r = d.get(position)
    cat = Catalogue.load(s.schemas.path)
    reg = _registry(s)
    value, headers, doc = corrected(r, Decoder(cat, reg), Encoder(cat, reg), sets=list(sets),
                                    patch=patch, by=operator())
    errors: list[str] = []
    where: list[str] = []

    def delivered(err: str | None, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            where.append(f"{msg.partition()}:{msg.offset()}")

    producer = Producer(producer_config(s))
    # beside its original (same partition): a replay keeps the key's order by DLQ position
    Forwarder(producer, group).send(d.topic, r.position.partition, r.key, value,
                                    list(headers), on_done=delivered)
    if producer.flush(s.kafka.request_timeout_s) or errors:
        raise BrokerUnavailable(f"could not write the corrected copy to {d.topic}: "
                                f"{errors[0] if errors else 'timed out'}")
    out = {"group": group, "original": str(r.position), "correction": where[0],
           "event_id": r.event_id, "payload": doc}
    if as_json:
        _echo_json(out)
    else:
        click.echo(f"correction of {r.position} written to {d.topic} at {where[0]}; "
                   f"`pipeline dlq replay --group {group} --key {r.key_text}` sends it")


@dlq.command("export")
@_filters
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@pass_ctx
def export_cmd(ctx: Context, /, fmt: str, **kw: Any) -> None:
    """Write the selected dead letters to stdout (jsonl: with headers and decoded payload)."""

    from pipeline.dlq.records import summaries

    now = dt.datetime.now(dt.UTC)
    picked = _select(ctx, kw)
    if fmt == "csv":
        rows = [row for d, rs in picked for row in summaries(rs, now, d.group)]
        fields = [*(rows[0] if rows else {"group": None, "position": None})]
        w = csv.DictWriter(sys.stdout, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        return
    decoder = _decoder(ctx)
    for d, rs in picked:
        for r in rs:
            payload, error = _payload(decoder, r)
            click.echo(json.dumps({"group": d.group, **r.summary(now), "headers": _headers(r),
                                   "payload": payload, "payload_error": error}, default=str))


COMMANDS = [dlq]
