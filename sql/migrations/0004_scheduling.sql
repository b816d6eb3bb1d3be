-- 0004_scheduling: an index for the idle worker's "when is the next scheduled task" probe,
-- a NOTIFY for delayed tasks too, the concurrency key in task_overview, and pgidem.schedules
-- (the periodic schedules that schedulers run, for `pgidem status` and psql). See
-- docs/scheduling.md.

-- next_run_at (sql/queries.sql) asks, per queue, for the earliest queued run_at still to come:
-- a scan of this index from now() on, stopping at the first entry of the queue.
-- tasks_claimable (queue, priority DESC, run_at, id) cannot answer it without reading every
-- queued row of the queue (run_at comes after priority). run_at leads, not queue, so that the
-- claim can never take this index for its `queue = ...` and sort a deep queue by priority
-- (with (queue, run_at) the planner did, on a misestimate, reading every runnable row).
CREATE INDEX tasks_scheduled ON pgidem.tasks (run_at, queue) WHERE state = 'queued';

-- pgidem.enqueue and pgidem.enqueue_many as in 0001, except that a delayed task notifies as
-- well: without it an idle worker would learn of a task due before its next poll only at that
-- poll. A notified worker whose queue has nothing runnable claims nothing and sleeps until the
-- earliest run_at. (PostgreSQL folds equal notifications of one transaction into one.)

CREATE OR REPLACE FUNCTION pgidem.enqueue(
    task_name       text,
    args            jsonb       DEFAULT '{}',
    queue           text        DEFAULT 'default',
    idempotency_key text        DEFAULT NULL,
    run_at          timestamptz DEFAULT NULL,
    priority        integer     DEFAULT 0,
    max_attempts    integer     DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id        bigint;
    existing_args jsonb;
BEGIN
    PERFORM pgidem._check_task_input(enqueue.task_name, enqueue.queue, enqueue.idempotency_key,
                                     enqueue.run_at, enqueue.priority, enqueue.max_attempts);
    PERFORM pgidem._check_args(enqueue.args);
    LOOP
        INSERT INTO pgidem.tasks (task_name, args, queue, idempotency_key, run_at, priority,
                                  max_attempts)
        VALUES (enqueue.task_name, enqueue.args, enqueue.queue, enqueue.idempotency_key,
                coalesce(enqueue.run_at, now()), enqueue.priority,
                coalesce(enqueue.max_attempts, 5))
        ON CONFLICT (task_name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id INTO new_id;
        IF new_id IS NOT NULL THEN
            -- A delayed task notifies too: an idle worker then recomputes when to wake up
            -- (next_run_at) instead of sleeping out its poll interval.
            PERFORM pg_notify('pgidem', enqueue.queue);
            RETURN new_id;
        END IF;
        SELECT t.id, t.args INTO new_id, existing_args
          FROM pgidem.tasks t
         WHERE t.task_name = enqueue.task_name AND t.idempotency_key = enqueue.idempotency_key;
        IF FOUND THEN
            IF existing_args IS DISTINCT FROM enqueue.args THEN
                RAISE EXCEPTION 'idempotency key % of task % was already used with different args',
                    quote_literal(enqueue.idempotency_key), quote_literal(enqueue.task_name)
                    USING ERRCODE = 'PI001',
                          DETAIL = format('existing task %s has args %s; this call passed %s',
                                          new_id, left(existing_args::text, 200),
                                          left(enqueue.args::text, 200)),
                          HINT = 'a reused key must carry the same request; use a new key for a new request';
            END IF;
            RETURN new_id;
        END IF;
        -- The conflicting task was pruned between our INSERT and SELECT: try again.
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgidem.enqueue_many(
    task_name        text,
    args             jsonb[],
    queue            text        DEFAULT 'default',
    idempotency_keys text[]      DEFAULT NULL,
    run_at           timestamptz DEFAULT NULL,
    priority         integer     DEFAULT 0,
    max_attempts     integer     DEFAULT NULL
) RETURNS TABLE (ord bigint, id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n        integer := coalesce(array_length(enqueue_many.args, 1), 0);
    seq      regclass := pg_get_serial_sequence('pgidem.tasks', 'id')::regclass;
    ids      bigint[];
    bad      record;
    bad_row  bigint;
BEGIN
    PERFORM pgidem._check_task_input(enqueue_many.task_name, enqueue_many.queue, NULL,
                                     enqueue_many.run_at, enqueue_many.priority,
                                     enqueue_many.max_attempts);
    IF n = 0 THEN
        RETURN;
    END IF;
    IF enqueue_many.idempotency_keys IS NOT NULL
       AND coalesce(array_length(enqueue_many.idempotency_keys, 1), 0) <> n THEN
        RAISE EXCEPTION 'invalid idempotency_keys: % keys for % args; pass one key (or NULL) per task',
            coalesce(array_length(enqueue_many.idempotency_keys, 1), 0), n
            USING ERRCODE = 'PI002', COLUMN = 'idempotency_key';
    END IF;
    -- The same per-row rules as pgidem.enqueue (the same functions), for the whole batch in one
    -- scan; the first bad row is named in the message (1-based).
    SELECT u.i, pgidem._args_problem(u.a) AS args_problem,
           pgidem._key_problem(u.k) AS key_problem INTO bad
      FROM unnest(enqueue_many.args, enqueue_many.idempotency_keys) WITH ORDINALITY AS u(a, k, i)
     WHERE pgidem._args_problem(u.a) IS NOT NULL OR pgidem._key_problem(u.k) IS NOT NULL
     ORDER BY u.i
     LIMIT 1;
    IF FOUND THEN
        IF bad.args_problem IS NOT NULL THEN
            RAISE EXCEPTION 'row %: %', bad.i, bad.args_problem
                USING ERRCODE = 'PI002', COLUMN = 'args';
        END IF;
        RAISE EXCEPTION 'row %: %', bad.i, bad.key_problem
            USING ERRCODE = 'PI002', COLUMN = 'idempotency_key';
    END IF;

    -- ids[i] is the task id of row i once resolved. Every statement below walks the arrays with
    -- unnest (O(n)); indexing a jsonb[] or text[] per row (args[i]) would be O(n^2).
    LOOP
        -- Insert every unresolved row, each with an id drawn first so that it maps back to its
        -- position without relying on RETURNING order. In key order: concurrent bulk calls
        -- with overlapping keys take the unique-index entries in one order and cannot
        -- deadlock; a key repeated within the call is inserted at its first position.
        WITH input AS MATERIALIZED (
            SELECT u.i, u.a, u.k, u.known,
                   CASE WHEN u.known IS NULL THEN nextval(seq) END AS new_id
              FROM unnest(enqueue_many.args, enqueue_many.idempotency_keys, ids)
                   WITH ORDINALITY AS u(a, k, known, i)
        ), ins AS (
            INSERT INTO pgidem.tasks (id, task_name, args, queue, idempotency_key, run_at,
                                      priority, max_attempts)
            SELECT input.new_id, enqueue_many.task_name, input.a, enqueue_many.queue, input.k,
                   coalesce(enqueue_many.run_at, now()), enqueue_many.priority,
                   coalesce(enqueue_many.max_attempts, 5)
              FROM input
             WHERE input.new_id IS NOT NULL
             ORDER BY input.k, input.i
            ON CONFLICT (task_name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id
        )
        SELECT array_agg(coalesce(input.known, ins.id) ORDER BY input.i) INTO ids
          FROM input LEFT JOIN ins ON ins.id = input.new_id;
        -- Rows whose insert did nothing take the id of the task that holds their key: one
        -- enqueued before, one committed meanwhile by a concurrent caller (this statement's
        -- snapshot is newer than the wait in the INSERT), or an earlier row of this call. Their
        -- args must be equal (the Stripe rule); the first row that differs is reported.
        SELECT array_agg(coalesce(r.id, t.id) ORDER BY r.i),
               min(r.i) FILTER (WHERE t.id IS NOT NULL AND t.args IS DISTINCT FROM r.a)
          INTO ids, bad_row
          FROM unnest(ids, enqueue_many.idempotency_keys, enqueue_many.args)
               WITH ORDINALITY AS r(id, k, a, i)
          LEFT JOIN pgidem.tasks t
                 ON r.id IS NULL
                AND t.task_name = enqueue_many.task_name
                AND t.idempotency_key = r.k;
        IF bad_row IS NOT NULL THEN
            SELECT t.id, t.args INTO bad
              FROM pgidem.tasks t
             WHERE t.id = ids[bad_row];
            RAISE EXCEPTION 'idempotency key % of task % was already used with different args',
                quote_literal(enqueue_many.idempotency_keys[bad_row]),
                quote_literal(enqueue_many.task_name)
                USING ERRCODE = 'PI001',
                      DETAIL = format('row %s: existing task %s has args %s; this call passed %s',
                                      bad_row, bad.id, left(bad.args::text, 200),
                                      left(enqueue_many.args[bad_row]::text, 200)),
                      HINT = 'a reused key must carry the same request; use a new key for a new request';
        END IF;
        EXIT WHEN array_position(ids, NULL) IS NULL;
        -- A conflicting task was pruned between the INSERT and the lookup: try those again.
    END LOOP;
    -- Delayed tasks notify too (see pgidem.enqueue above).
    PERFORM pg_notify('pgidem', enqueue_many.queue);
    RETURN QUERY SELECT r.i, r.id FROM unnest(ids) WITH ORDINALITY AS r(id, i);
END
$$;

-- task_overview as in 0001, plus the task's concurrency key (0003). Appended as the last column
-- so that CREATE OR REPLACE keeps what depends on the view (other views, grants).
CREATE OR REPLACE VIEW pgidem.task_overview AS
SELECT t.id, t.task_name, t.queue, t.state, t.priority, t.attempts, t.max_attempts,
       t.idempotency_key, t.run_at, t.created_at, t.started_at, t.finished_at,
       t.fencing_token, t.lease_owner, t.lease_expires_at,
       la.status AS last_attempt_status, la.worker_id AS last_attempt_worker,
       la.error_class AS last_error_class, la.error_message AS last_error_message,
       o.state AS outcome_state, o.result, o.error AS outcome_error, t.args,
       t.concurrency_key
  FROM pgidem.tasks t
  LEFT JOIN LATERAL (
      SELECT a.status, a.worker_id, a.error_class, a.error_message
        FROM pgidem.attempts a
       WHERE a.task_id = t.id
       ORDER BY a.fencing_token DESC
       LIMIT 1
  ) la ON true
  LEFT JOIN pgidem.outcomes o ON o.task_id = t.id;

-- The periodic schedules that schedulers run: one row per schedule name, upserted by each
-- scheduler when it starts and after every pass that enqueued a tick. Several schedulers write
-- the same row harmlessly (one statement each, and last_tick only moves forward). For people
-- (`pgidem status`, psql), not for scheduling: no scheduler reads it; the idempotency key of
-- each tick is what makes one task per tick. A schedule that no scheduler runs any more keeps
-- its row: updated_at says when a scheduler last ran it.
CREATE TABLE pgidem.schedules (
    name         text        PRIMARY KEY,
    task_name    text        NOT NULL,
    cron         text        NOT NULL,
    timezone     text        NOT NULL,
    queue        text        NOT NULL,
    last_tick    timestamptz,
    last_task_id bigint,
    next_tick    timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_name_length CHECK (length(name) BETWEEN 1 AND 200)
);
