-- 0003_control: global limits per queue (most running tasks, most starts per period, most
-- running tasks per concurrency key), enqueue with a concurrency key, and the limits in the
-- queue_stats view. See docs/scheduling.md for how the claim enforces them.
--
-- Errors raised here use SQLSTATE PI002 (invalid input), like 0001.

-- A task's concurrency key: at most `max_per_key` tasks of the same queue with the same key run
-- at once (one account's tasks one at a time, say). NULL: no key.
ALTER TABLE pgidem.tasks ADD COLUMN concurrency_key text
    DEFAULT nullif(current_setting('pgidem._concurrency_key', true), '');
ALTER TABLE pgidem.tasks ADD CONSTRAINT tasks_concurrency_key_length
    CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 255);
-- The claim counts running tasks per key through this: only running rows with a key are in it,
-- so it stays as small as the number of running keyed tasks.
CREATE INDEX tasks_running_key
    ON pgidem.tasks (queue, concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;

-- One row per queue with limits. A queue without a row has none, and its claims take no lock.
-- A queue with a row is claimed under that row's lock (FOR NO KEY UPDATE), so the claim that
-- counts its running tasks and recent starts is the only one doing so for that queue at that
-- moment: no two workers can both see room for the last slot. A NULL limit is no limit.
-- The row also exists (with NULL limits) for every queue that ever got a task with a
-- concurrency key: the key limit needs the same lock.
CREATE TABLE pgidem.queue_limits (
    queue       text        PRIMARY KEY,
    max_running integer,
    rate_limit  integer,
    rate_period interval    NOT NULL DEFAULT interval '1 second',
    max_per_key integer     NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_limits_queue_valid
        CHECK (queue ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$'),
    CONSTRAINT queue_limits_max_running_range
        CHECK (max_running IS NULL OR max_running BETWEEN 0 AND 1000000),
    CONSTRAINT queue_limits_rate_limit_range
        CHECK (rate_limit IS NULL OR rate_limit BETWEEN 1 AND 1000000),
    CONSTRAINT queue_limits_rate_period_range
        CHECK (rate_period BETWEEN interval '1 millisecond' AND interval '1 day'),
    CONSTRAINT queue_limits_max_per_key_range
        CHECK (max_per_key BETWEEN 1 AND 1000000)
);

-- Task starts of rate-limited queues, one row per claim (with how many tasks it started), at
-- the claim's transaction time, which is also the attempts' claimed_at. The claim sums the rows
-- of the last period under the queue's lock and deletes rows older than twice the period (plus
-- a minute, for claims whose transaction started before a later one's and waited for the lock).
CREATE TABLE pgidem.queue_starts (
    queue      text        NOT NULL,
    started_at timestamptz NOT NULL,
    started    integer     NOT NULL,
    CONSTRAINT queue_starts_started_positive
        CHECK (started >= 1)
);
CREATE INDEX queue_starts_queue_time ON pgidem.queue_starts (queue, started_at);

-- Set (or change) a queue's limits; NULL removes that limit. Takes effect at the next claim.
--   max_running: at most this many tasks of the queue running at once, across all workers
--                (0 pauses the queue);
--   rate_limit:  at most this many task starts per rate_period, across all workers;
--   max_per_key: at most this many running tasks per concurrency key in the queue.
-- Raises PI002 on a bad queue name or a value out of range.
CREATE FUNCTION pgidem.set_queue_limit(
    queue       text,
    max_running integer  DEFAULT NULL,
    rate_limit  integer  DEFAULT NULL,
    rate_period interval DEFAULT interval '1 second',
    max_per_key integer  DEFAULT 1
) RETURNS void
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgidem._check_task_input('x', set_queue_limit.queue, NULL, NULL, 0, NULL);
    IF set_queue_limit.max_running IS NOT NULL
       AND set_queue_limit.max_running NOT BETWEEN 0 AND 1000000 THEN
        RAISE EXCEPTION 'invalid max_running %: it must be between 0 and 1000000 (or NULL for '
            'no limit)', set_queue_limit.max_running
            USING ERRCODE = 'PI002', COLUMN = 'max_running';
    END IF;
    IF set_queue_limit.rate_limit IS NOT NULL
       AND set_queue_limit.rate_limit NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'invalid rate_limit %: it must be between 1 and 1000000 (or NULL for '
            'no limit)', set_queue_limit.rate_limit
            USING ERRCODE = 'PI002', COLUMN = 'rate_limit';
    END IF;
    IF set_queue_limit.rate_period IS NULL
       OR set_queue_limit.rate_period NOT BETWEEN interval '1 millisecond' AND interval '1 day' THEN
        RAISE EXCEPTION 'invalid rate_period %: it must be between 1 millisecond and 1 day',
            coalesce(set_queue_limit.rate_period::text, 'NULL')
            USING ERRCODE = 'PI002', COLUMN = 'rate_period';
    END IF;
    IF set_queue_limit.max_per_key IS NULL
       OR set_queue_limit.max_per_key NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'invalid max_per_key %: it must be between 1 and 1000000',
            coalesce(set_queue_limit.max_per_key::text, 'NULL')
            USING ERRCODE = 'PI002', COLUMN = 'max_per_key';
    END IF;
    INSERT INTO pgidem.queue_limits AS l (queue, max_running, rate_limit, rate_period,
                                          max_per_key)
    VALUES (set_queue_limit.queue, set_queue_limit.max_running, set_queue_limit.rate_limit,
            set_queue_limit.rate_period, set_queue_limit.max_per_key)
    ON CONFLICT (queue) DO UPDATE
       SET max_running = EXCLUDED.max_running, rate_limit = EXCLUDED.rate_limit,
           rate_period = EXCLUDED.rate_period, max_per_key = EXCLUDED.max_per_key,
           updated_at = now();
    IF set_queue_limit.rate_limit IS NULL THEN
        DELETE FROM pgidem.queue_starts s WHERE s.queue = set_queue_limit.queue;
    END IF;
    -- Workers sleeping on a paused or full queue may now have room.
    PERFORM pg_notify('pgidem', set_queue_limit.queue);
END
$$;

-- Enqueue with a concurrency key: pgidem.enqueue's parameters plus a trailing concurrency_key.
-- A function of its own name (an overload of pgidem.enqueue with one more defaulted parameter
-- would make every existing call ambiguous). The key is part of the request: the same
-- idempotency key with another concurrency key raises PI001. The task row gets its key from the
-- column default (the transaction-local setting pgidem._concurrency_key, set here around the
-- call), so the rules of pgidem.enqueue are not written twice. The queue gets a limits row (no
-- limits, max_per_key 1) if it has none: the claim enforces key limits under that row's lock.
CREATE FUNCTION pgidem.enqueue_keyed(
    task_name       text,
    args            jsonb       DEFAULT '{}',
    queue           text        DEFAULT 'default',
    idempotency_key text        DEFAULT NULL,
    run_at          timestamptz DEFAULT NULL,
    priority        integer     DEFAULT 0,
    max_attempts    integer     DEFAULT NULL,
    concurrency_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id   bigint;
    existing text;
BEGIN
    IF enqueue_keyed.concurrency_key IS NOT NULL
       AND length(enqueue_keyed.concurrency_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'invalid concurrency key: it must be 1 to 255 characters (got %)',
            length(enqueue_keyed.concurrency_key)
            USING ERRCODE = 'PI002', COLUMN = 'concurrency_key';
    END IF;
    IF enqueue_keyed.concurrency_key IS NOT NULL THEN
        PERFORM pgidem._check_task_input(enqueue_keyed.task_name, enqueue_keyed.queue, NULL,
                                         NULL, 0, NULL);
        INSERT INTO pgidem.queue_limits (queue) VALUES (enqueue_keyed.queue)
        ON CONFLICT DO NOTHING;
    END IF;
    -- Transaction-local; if the call below raises, the caller's savepoint rollback (or the end
    -- of its failed transaction) undoes the setting too.
    PERFORM set_config('pgidem._concurrency_key', coalesce(enqueue_keyed.concurrency_key, ''),
                       true);
    new_id := pgidem.enqueue(enqueue_keyed.task_name, enqueue_keyed.args, enqueue_keyed.queue,
                             enqueue_keyed.idempotency_key, enqueue_keyed.run_at,
                             enqueue_keyed.priority, enqueue_keyed.max_attempts);
    PERFORM set_config('pgidem._concurrency_key', '', true);
    SELECT t.concurrency_key INTO existing FROM pgidem.tasks t WHERE t.id = new_id;
    IF existing IS DISTINCT FROM enqueue_keyed.concurrency_key THEN
        RAISE EXCEPTION 'idempotency key % of task % was already used with another '
            'concurrency key',
            quote_literal(enqueue_keyed.idempotency_key), quote_literal(enqueue_keyed.task_name)
            USING ERRCODE = 'PI001',
                  DETAIL = format('existing task %s has concurrency key %s; this call passed %s',
                                  new_id, coalesce(existing, 'NULL'),
                                  coalesce(enqueue_keyed.concurrency_key, 'NULL')),
                  HINT = 'a reused key must carry the same request; use a new key for a new request';
    END IF;
    RETURN new_id;
END
$$;

-- For people in psql: per-queue counts by state, the age of the oldest runnable task, and the
-- queue's limits with how much of the rate limit's current period is used. Queues with limits
-- but no tasks are listed too.
CREATE OR REPLACE VIEW pgidem.queue_stats AS
SELECT coalesce(s.queue, l.queue) AS queue,
       coalesce(s.available, 0) AS available,
       coalesce(s.scheduled, 0) AS scheduled,
       coalesce(s.running, 0) AS running,
       coalesce(s.succeeded, 0) AS succeeded,
       coalesce(s.dead, 0) AS dead,
       coalesce(s.cancelled, 0) AS cancelled,
       s.oldest_available_age,
       l.max_running,
       l.rate_limit,
       l.rate_period,
       l.max_per_key,
       CASE WHEN l.rate_limit IS NOT NULL THEN
           (SELECT coalesce(sum(q.started), 0) FROM pgidem.queue_starts q
             WHERE q.queue = l.queue AND q.started_at > now() - l.rate_period)
       END AS started_in_period
  FROM (
      SELECT t.queue,
             count(*) FILTER (WHERE t.state = 'queued' AND t.run_at <= now()) AS available,
             count(*) FILTER (WHERE t.state = 'queued' AND t.run_at > now())  AS scheduled,
             count(*) FILTER (WHERE t.state = 'running')                      AS running,
             count(*) FILTER (WHERE t.state = 'succeeded')                    AS succeeded,
             count(*) FILTER (WHERE t.state = 'dead')                         AS dead,
             count(*) FILTER (WHERE t.state = 'cancelled')                    AS cancelled,
             now() - min(t.run_at) FILTER (WHERE t.state = 'queued' AND t.run_at <= now())
                 AS oldest_available_age
        FROM pgidem.tasks t
       GROUP BY t.queue
  ) s
  FULL JOIN pgidem.queue_limits l ON l.queue = s.queue;
