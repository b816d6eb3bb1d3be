"""The ``pgidem`` command line: migrate, run workers, enqueue, and look at and steer tasks."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from pgidem import _dsn, _log, _migrate, _store
from pgidem.app import App
from pgidem.errors import ConfigurationError, PgidemError, mapped_errors

F = TypeVar("F", bound=Callable[..., Any])


def dsn_option(fn: F) -> F:
    # No envvar= here: PGIDEM_DSN is read by pgidem._dsn.resolve, so that the log line and
    # `pgidem where` can say whether the DSN came from --dsn or from the environment.
    return click.option(
        "--dsn",
        default=None,
        help="PostgreSQL connection string (default: $PGIDEM_DSN, else the embedded server, "
        "else libpq's environment).",
    )(fn)


@contextmanager
def failures() -> Iterator[None]:
    """Turn pgidem's errors into a one-line message and exit status 1."""
    try:
        yield
    except PgidemError as exc:
        raise click.ClickException(str(exc)) from exc


def load_app(path: str) -> App:
    """Import ``MODULE:ATTR`` and return the App it names.

    Raises:
        ConfigurationError: the module or attribute is missing or not an App.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--app must look like MODULE:ATTR, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r} (from --app {path}): {exc}"
        ) from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigurationError(f"{path} is not a pgidem.App (got {type(app).__name__})")
    return app


def parse_queue_options(values: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Split ``--queue`` values into plain queues and ``QUEUE=N`` queues with their slots.

    Raises:
        click.BadParameter: a malformed value, a bad N, or a queue given twice.
    """
    plain: list[str] = []
    own: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        name = name.strip()
        if not name:
            raise click.BadParameter(f"{value!r} has no queue name", param_hint="--queue")
        if name in plain or name in own:
            raise click.BadParameter(f"queue {name!r} is given twice", param_hint="--queue")
        if not sep:
            plain.append(name)
            continue
        try:
            slots = int(count)
        except ValueError:
            slots = 0
        if not 1 <= slots <= 1000:
            raise click.BadParameter(
                f"{value!r}: the concurrency after '=' must be a whole number from 1 to 1000",
                param_hint="--queue",
            )
        own[name] = slots
    return plain, own


def _app(dsn: str | None) -> App:
    return App(dsn)


class _Commands(click.Group):
    """The command group; `stability` and `demo` are imported only when asked for (their
    module and the fake payment service cost every `pgidem worker` start about 27 ms)."""

    _lazy = {"stability": "stability_command", "demo": "demo_command"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy and cmd_name not in self.commands:
            from pgidem import _stability

            self.add_command(getattr(_stability, self._lazy[cmd_name]))
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.option("--log-level", default="INFO", show_default=True, help="Lowest log level shown.")
@click.option("--log-json/--log-pretty", default=None, help="Log format (default: by terminal).")
def main(log_level: str, log_json: bool | None) -> None:
    """pgidem: a PostgreSQL task queue whose retries are safe."""
    _log.configure(level=log_level.upper(), json=log_json)


@main.command()
@dsn_option
def migrate(dsn: str | None) -> None:
    """Create or upgrade the pgidem schema (safe to run from several processes at once)."""
    with failures():
        app = _app(dsn)
        applied = app.migrate()
        if applied:
            click.echo(f"applied migrations {', '.join(f'{v:04d}' for v in applied)}")
        else:
            click.echo(f"the schema is up to date (version {_migrate.code_version()})")


@main.command()
@click.option("--app", "app_path", required=True, help="The App to run, as MODULE:ATTR.")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="A queue to serve, or QUEUE=N for N slots of its own (repeat; default all queues of "
    "the app's tasks). Plain queues share --concurrency slots.",
)
@click.option(
    "--concurrency", default=4, show_default=True, type=int, help="Handlers run at once (threads)."
)
@click.option(
    "--lease",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds a claim holds a task without a heartbeat.",
)
@click.option(
    "--poll-interval",
    default=1.0,
    show_default=True,
    type=float,
    help="Seconds between polls when no NOTIFY arrives.",
)
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=int,
    help="Most tasks claimed (and completed in one transaction) at once.",
)
@click.option(
    "--grace-period",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to let running handlers finish on SIGTERM.",
)
@click.option(
    "--commit-interval",
    default=0.05,
    show_default=True,
    type=float,
    help="Seconds a completion transaction may stay open to take in more quick tasks of its "
    "batch before it commits (one commit per batch).",
)
@click.option(
    "--task-savepoints/--no-task-savepoints",
    default=False,
    show_default=True,
    help="Give every task that writes a savepoint of its own, so that a failing task never "
    "makes the batch-mates that shared its transaction run again (slower for quick writing "
    "tasks; see docs/handlers.md).",
)
@click.option(
    "--prune-interval",
    default="0",
    show_default=True,
    help="How often this worker prunes finished tasks older than the retention, in batches "
    "(seconds, or 90s/15m/12h/7d); 0: never.",
)
@click.option(
    "--prune-batch-size",
    default=1000,
    show_default=True,
    type=int,
    help="Tasks (and once keys) pruned per batch, one short transaction each.",
)
@click.option(
    "--prune-older-than",
    default=None,
    help="The pruner's retention (seconds, or 90s/15m/12h/7d); default the database setting "
    "pgidem.key_retention (7 days when unset).",
)
@dsn_option
@click.option(
    "--scheduler/--no-scheduler",
    default=True,
    show_default=True,
    help="Enqueue the app's periodic tasks from this worker (safe on every worker).",
)
@click.option(
    "--catch-up-window",
    default="1d",
    show_default=True,
    help="After downtime the scheduler enqueues the latest missed tick of a periodic task only "
    "if it is no older than this (seconds, or 90s/15m/12h/7d; at most 366 days). Clamped to "
    "the key retention and --prune-older-than.",
)
@click.option(
    "--max-catch-up",
    default=1000,
    show_default=True,
    type=int,
    help="Most missed ticks of one periodic task enqueued at once (1 to 100000); a longer "
    "gap counts as downtime.",
)
def worker(
    app_path: str,
    queues: tuple[str, ...],
    concurrency: int,
    lease: float,
    poll_interval: float,
    batch_size: int,
    grace_period: float,
    commit_interval: float,
    prune_interval: str,
    prune_batch_size: int,
    prune_older_than: str | None,
    dsn: str | None,
    scheduler: bool = True,
    catch_up_window: str = "1d",
    max_catch_up: int = 1000,
    task_savepoints: bool = False,
) -> None:
    """Run a worker for the tasks registered on an App.

    Exits 0 after SIGTERM/SIGINT. When every slot is stuck in a handler past its timeout, it
    stops gracefully and re-executes itself (same command line, same pid)."""
    from pgidem._pruner import parse_duration
    from pgidem.worker import Worker, WorkerConfig

    with failures():
        app = load_app(app_path)
        if dsn:
            app._dsn_arg = dsn
            app._resolved = None
        plain, own = parse_queue_options(queues)
        if not plain and not own:
            plain = sorted({t.queue for t in app.tasks.values()})
        config = WorkerConfig(
            queues=plain,
            queue_concurrency=own,
            scheduler=scheduler,
            concurrency=concurrency,
            lease=lease,
            poll_interval=poll_interval,
            batch_size=batch_size,
            grace_period=grace_period,
            commit_interval=commit_interval,
            task_savepoints=task_savepoints,
            prune_interval=parse_duration(prune_interval),
            prune_batch_size=prune_batch_size,
            prune_older_than=None if prune_older_than is None else parse_duration(prune_older_than),
            catch_up_window=parse_duration(catch_up_window),
            max_catch_up=max_catch_up,
        )
        code = Worker(app, config).run(reexec=True)
    sys.exit(code)


@main.command()
@click.argument("task_name")
@click.option("--args", "args_json", default="{}", help="The task's args, a JSON object.")
@click.option("--key", default=None, help="Idempotency key.")
@click.option("--queue", default="default", show_default=True)
@click.option("--priority", default=0, type=int, show_default=True, help="Higher runs first.")
@click.option("--max-attempts", default=None, type=int)
@click.option("--delay", default=None, type=float, help="Seconds from now before it may run.")
@click.option("--run-at", default=None, help="When it may run, ISO 8601 with a timezone.")
@click.option(
    "--concurrency-key",
    default=None,
    help="At most max_per_key (default 1) tasks of the queue with this key run at once.",
)
@dsn_option
def enqueue(
    task_name: str,
    args_json: str,
    key: str | None,
    queue: str,
    priority: int,
    max_attempts: int | None,
    delay: float | None,
    run_at: str | None,
    dsn: str | None,
    concurrency_key: str | None = None,
) -> None:
    """Enqueue a task; print its id."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--args") from exc
    when = None
    if run_at is not None:
        try:
            when = datetime.fromisoformat(run_at)
        except ValueError as exc:
            raise click.BadParameter(
                f"not an ISO 8601 time: {run_at!r}", param_hint="--run-at"
            ) from exc
    with failures():
        handle = _app(dsn).enqueue(
            task_name,
            args,
            idempotency_key=key,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            delay=delay,
            run_at=when,
            concurrency_key=concurrency_key,
        )
        click.echo(handle.id)


@main.command()
@dsn_option
def status(dsn: str | None) -> None:
    """Counts per queue and state, the oldest waiting task, and live workers."""
    with failures(), _app(dsn) as app:
        with app.pool.connection() as conn:
            queues = _store.queue_status(conn)
            workers = _store.workers_live(conn)
            limits = _store.queue_limits_list(conn)
            schedules = _store.schedule_list(conn)
        click.echo(f"database: {app.resolved.describe()}")
        header = (
            "queue",
            "available",
            "scheduled",
            "running",
            "succeeded",
            "dead",
            "cancelled",
            "oldest_wait_s",
        )
        rows = [
            (
                q["queue"],
                q["available"],
                q["scheduled"],
                q["running"],
                q["succeeded"],
                q["dead"],
                q["cancelled"],
                "-" if q["oldest_available_s"] is None else f"{q['oldest_available_s']:.1f}",
            )
            for q in queues
        ]
        _table(header, rows)
        if limits:
            click.echo("")
            click.echo("limits:")
            _limits_table(limits)
        if schedules:
            click.echo("")
            click.echo("schedules:")
            _schedules_table(schedules)
        click.echo("")
        from pgidem.worker import STALE_WORKER_S

        stale = sum(1 for w in workers if w["heartbeat_age_s"] > STALE_WORKER_S)
        note = f" (and {stale} silent for over {STALE_WORKER_S:.0f} s: gone)" if stale else ""
        click.echo(f"workers: {len(workers) - stale}{note}")
        _table(
            ("id", "queues", "concurrency", "heartbeat_age_s"),
            [
                (w["id"], ",".join(w["queues"]), w["concurrency"], f"{w['heartbeat_age_s']:.1f}")
                for w in workers
            ],
        )


@main.command()
@click.argument("task_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@dsn_option
def show(task_id: int, as_json: bool, dsn: str | None) -> None:
    """A task, every attempt with its token, worker, times and end, and the outcome."""
    with failures(), _app(dsn) as app:
        with app.pool.connection() as conn:
            row = _store.task_get(conn, task_id)
            if row is None:
                raise click.ClickException(f"no task with id {task_id}")
            attempts = _store.task_attempts(conn, task_id)
            step_calls = _store.task_step_history(conn, task_id)
            control = _store.task_control(conn, task_id) or {}
        row = {**row, **control}
        if as_json:
            click.echo(
                json.dumps(
                    {"task": row, "attempts": attempts, "step_calls": step_calls},
                    default=str,
                    indent=2,
                )
            )
            return
        for name in (
            "id",
            "task_name",
            "queue",
            "state",
            "priority",
            "attempts",
            "max_attempts",
            "idempotency_key",
            "fencing_token",
            "lease_owner",
            "lease_expires_at",
            "run_at",
            "created_at",
            "started_at",
            "finished_at",
            "last_error",
            "concurrency_key",
        ):
            click.echo(f"{name:>16}: {row.get(name)}")
        if control.get("max_per_key") is not None:
            # The queue has a limits row (max_per_key is never NULL there), whichever limits
            # it sets: with only a concurrency key's limit, that is still a limit.
            click.echo(f"{'queue limits':>16}: {_limits_text(control)}")
        click.echo(f"{'args':>16}: {json.dumps(row['args'])}")
        stored = (
            row["outcome_result"] if row["outcome_state"] == "succeeded" else row["outcome_error"]
        )
        outcome = (
            "-"
            if row["outcome_state"] is None
            else f"{row['outcome_state']} (token {row['outcome_token']}) {json.dumps(stored)}"
        )
        click.echo(f"{'outcome':>16}: {outcome}")
        click.echo("")
        _table(
            ("token", "attempt", "status", "worker", "claimed_at", "finished_at", "error"),
            [
                (
                    a["fencing_token"],
                    a["attempt"],
                    a["status"],
                    a["worker_id"],
                    a["claimed_at"],
                    a["finished_at"] or "-",
                    ""
                    if a["error_class"] is None
                    else f"{a['error_class']}: {a['error_message']}"[:80],
                )
                for a in attempts
            ],
        )
        if step_calls:
            click.echo("")
            click.echo("steps:")
            for c in step_calls:
                click.echo(f"  {c['summary']} [key {c['step_key']}]")


@main.command()
@click.argument("task_id", type=int)
@dsn_option
def retry(task_id: int, dsn: str | None) -> None:
    """Put a dead or cancelled task back in its queue."""
    with failures(), _app(dsn) as app:
        previous = app.retry(task_id)
        click.echo(f"task {task_id}: {previous} -> queued")


@main.command()
@click.argument("task_id", type=int)
@dsn_option
def cancel(task_id: int, dsn: str | None) -> None:
    """Cancel a queued task, or flag a running one (its completion will be refused)."""
    with failures(), _app(dsn) as app:
        previous = app.cancel(task_id)
        click.echo(f"task {task_id}: {previous} -> cancelled")


@main.command()
@click.option(
    "--older-than",
    default=None,
    help="The retention: seconds, or 90s/15m/12h/7d/2w; default the database setting "
    "pgidem.key_retention (7 days when unset).",
)
@click.option(
    "--batch-size",
    type=int,
    default=1000,
    show_default=True,
    help="Tasks (and once keys) per batch; each batch is one short transaction.",
)
@click.option(
    "--max-batches", type=int, default=None, help="Stop after this many batches (default: all)."
)
@click.option(
    "--pause",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds to sleep between batches (lighter on a busy server).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be pruned.")
@dsn_option
def prune(
    older_than: str | None,
    batch_size: int,
    max_batches: int | None,
    pause: float,
    dry_run: bool,
    dsn: str | None,
) -> None:
    """Delete finished tasks (with their attempts, outcomes, steps and step calls) and once keys
    older than the retention, in batches of short transactions that skip locked rows. A pruned
    task's idempotency key can be used again."""
    from pgidem._pruner import Pruner, PrunerConfig, parse_duration

    with failures():
        app = _app(dsn)
        seconds = None if older_than is None else parse_duration(older_than)
        if dry_run:
            with app.pool.connection() as conn:
                tasks, keys = _store.prune_pending(conn, older_than_s=seconds)
            click.echo(f"would prune {tasks} finished tasks and {keys} once keys")
            return
        config = PrunerConfig(
            older_than=seconds, batch_size=batch_size, max_batches=max_batches, pause=pause
        )
        result = Pruner(app.pool.connection, config).run_once()
        more = "" if result.complete else " (stopped at --max-batches; more are left)"
        click.echo(
            f"pruned {result.tasks} finished tasks and {result.once_keys} once keys in "
            f"{result.batches} batches ({result.seconds:.1f} s){more}"
        )


@main.command("where")
@dsn_option
def where(dsn: str | None) -> None:
    """Say which database pgidem commands would use, and why."""
    with failures(), mapped_errors():
        click.echo(_dsn.resolve(dsn).describe())


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _limits_text(limits: dict[str, Any]) -> str:
    """A queue's limits in one line: ``max_running 4, rate 10/1s, max_per_key 1``."""
    parts = []
    if limits.get("max_running") is not None:
        parts.append(f"max_running {limits['max_running']}")
    if limits.get("rate_limit") is not None:
        parts.append(f"rate {limits['rate_limit']}/{limits['rate_period_s']:g}s")
    parts.append(f"max_per_key {limits.get('max_per_key', 1)}")
    return ", ".join(parts)


def _limits_table(limits: list[dict[str, Any]]) -> None:
    def or_dash(value: Any) -> str:
        return "-" if value is None else str(value)

    _table(
        ("queue", "max_running", "running", "rate", "started_in_period", "max_per_key"),
        [
            (
                q["queue"],
                or_dash(q["max_running"]),
                q["running"],
                "-" if q["rate_limit"] is None else f"{q['rate_limit']}/{q['rate_period_s']:g}s",
                or_dash(q["started_in_period"]),
                q["max_per_key"],
            )
            for q in limits
        ],
    )


def _schedules_table(schedules: list[dict[str, Any]]) -> None:
    def when(value: datetime | None) -> str:
        return "-" if value is None else value.astimezone(UTC).isoformat(timespec="seconds")

    _table(
        (
            "schedule",
            "task",
            "cron",
            "timezone",
            "queue",
            "last_tick",
            "task_id",
            "next_tick",
            "updated_s_ago",
        ),
        [
            (
                s["name"],
                s["task_name"],
                s["cron"],
                s["timezone"],
                s["queue"],
                when(s["last_tick"]),
                "-" if s["last_task_id"] is None else s["last_task_id"],
                when(s["next_tick"]),
                f"{s['updated_age_s']:.0f}",
            )
            for s in schedules
        ],
    )


def _rate_option(value: str) -> tuple[int, float]:
    """``R`` or ``R/PERIOD`` (``10/1s``, ``100/1m``) as (rate, period in seconds)."""
    from pgidem._pruner import parse_duration

    rate_text, _, period_text = value.partition("/")
    try:
        rate = int(rate_text)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: give starts per period as R or R/PERIOD (10/1s, 600/1m)",
            param_hint="--rate",
        ) from exc
    with failures():
        period = parse_duration(period_text) if period_text else 1.0
    return rate, period


@main.command()
@click.argument("queue", required=False)
@click.option(
    "--max-running",
    default=None,
    help="At most N running tasks of the queue across all workers ('none': no limit; 0 pauses).",
)
@click.option(
    "--rate", default=None, help="At most R starts per period: R/PERIOD, e.g. 10/1s ('none': off)."
)
@click.option("--max-per-key", default=None, type=int, help="Running tasks per concurrency key.")
@click.option("--clear", is_flag=True, help="Remove the queue's max-running and rate limits.")
@dsn_option
def limit(
    queue: str | None,
    max_running: str | None,
    rate: str | None,
    max_per_key: int | None,
    clear: bool,
    dsn: str | None,
) -> None:
    """Show or set global limits of a queue (all queues' limits without arguments).

    Options not given keep their current value.
    """
    with failures(), _app(dsn) as app:
        current = {q["queue"]: q for q in app.queue_limits()}
        changing = clear or max_running is not None or rate is not None or max_per_key is not None
        if queue is None or not changing:
            shown = [q for q in current.values() if queue is None or q["queue"] == queue]
            if not shown:
                click.echo("no limits" + (f" on queue {queue}" if queue else ""))
            else:
                _limits_table(shown)
            return
        old = current.get(queue, {})
        new_max = old.get("max_running")
        new_rate, new_period = old.get("rate_limit"), old.get("rate_period_s") or 1.0
        if clear:
            new_max = new_rate = None
        if max_running is not None:
            if max_running.lower() == "none":
                new_max = None
            else:
                try:
                    new_max = int(max_running)
                except ValueError as exc:
                    raise click.BadParameter(
                        f"{max_running!r} is not a number (or 'none')", param_hint="--max-running"
                    ) from exc
        if rate is not None:
            if rate.lower() == "none":
                new_rate = None
            else:
                new_rate, new_period = _rate_option(rate)
        app.set_queue_limit(
            queue,
            max_running=new_max,
            rate_limit=new_rate,
            rate_period=new_period,
            max_per_key=max_per_key if max_per_key is not None else old.get("max_per_key", 1),
        )
        shown = [q for q in app.queue_limits() if q["queue"] == queue]
        _limits_table(shown)
