-- Every query pgidem's runtime code issues, each under a name (`-- name: <name>`). Python refers
-- to them by name through pgidem/_sql.py; parameters are psycopg's named placeholders. Arrays go
-- in binary (`%(name)b`): in text format psycopg quotes and escapes every element in Python,
-- which was a sixth of a worker's CPU per no-op task (a placeholder in a comment counts too).

-- name: schema_exists
-- Whether pgidem was ever migrated here (asked first: the next query needs the table).
SELECT to_regclass('pgidem.migrations') IS NOT NULL AS present;

-- name: schema_version
-- The highest applied migration.
SELECT coalesce(max(version), 0) AS version FROM pgidem.migrations;

-- name: migration_lock
-- Serialises concurrent `pgidem migrate` runs. Transaction-level, so it is released by the
-- commit or rollback and never outlives the migration (and works behind PgBouncer).
SELECT pg_advisory_xact_lock(hashtext('pgidem.migrate'));

-- name: migration_record
INSERT INTO pgidem.migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: task_enqueue
-- One definition of the rules: the SQL function that psql users call too.
SELECT pgidem.enqueue(%(task_name)s::text, %(args)s::jsonb, %(queue)s::text,
                      %(idempotency_key)s::text, %(run_at)s::timestamptz, %(priority)s::integer,
                      %(max_attempts)s::integer) AS id;

-- name: task_enqueue_many
-- Bulk enqueue, one round trip per batch: arrays in, (position, id) out. The args go in binary
-- format (a text[] of JSON texts, each parsed by the cast): in text format psycopg escapes every
-- element with a regular expression, which cost more client time than the rest of the call.
SELECT ord, id
  FROM pgidem.enqueue_many(%(task_name)s::text, %(args)b::jsonb[], %(queue)s::text,
                           %(idempotency_keys)s::text[], %(run_at)s::timestamptz,
                           %(priority)s::integer, %(max_attempts)s::integer)
 ORDER BY ord;

-- name: task_enqueue_copy_start
-- Bulk enqueue without idempotency keys by binary COPY (App.enqueue_many), step 1 of 3: what
-- pgidem.enqueue_many does before and around its INSERT. Its once-per-call checks (the same
-- function, so the same messages and SQLSTATE), first; then its NOTIFY (delivered at commit,
-- so it may precede the rows), and %(n)s ids drawn from the table's sequence in row order, as
-- its unkeyed INSERT draws them. run_at and max_attempts are the values that INSERT writes,
-- by the same expressions. Each CTE reads the one before, so nothing runs before the checks.
WITH checked AS MATERIALIZED (
    SELECT pg_get_serial_sequence('pgidem.tasks', 'id')::regclass AS seq
      FROM pgidem._check_task_input(%(task_name)s::text, %(queue)s::text, NULL,
                                    %(run_at)s::timestamptz, %(priority)s::integer,
                                    %(max_attempts)s::integer)
), notified AS MATERIALIZED (
    SELECT c.seq, pg_notify('pgidem', %(queue)s::text) AS sent FROM checked c
)
SELECT coalesce(%(run_at)s::timestamptz, now()) AS run_at,
       coalesce(%(max_attempts)s::integer, 5) AS max_attempts,
       array(SELECT nextval(n.seq) FROM generate_series(1, %(n)s::integer)) AS ids
  FROM notified n;

-- name: task_enqueue_copy
-- Step 2: the rows, streamed in binary (psycopg's COPY writer). The columns pgidem.enqueue_many
-- sets; every other one takes its default as in that INSERT (state, attempts, created_at, and
-- concurrency_key, which reads the setting pgidem._concurrency_key).
COPY pgidem.tasks (id, task_name, args, queue, run_at, priority, max_attempts)
FROM STDIN (FORMAT BINARY);

-- name: task_enqueue_copy_bad_ids
-- Step 3: the per-row rule of pgidem.enqueue_many, pgidem._args_problem, on the args as stored
-- (their jsonb text, which is not the client's JSON text: 1e300 prints as 301 digits). The ids
-- of the bad rows between the call's lowest and highest id: none for a good call. A concurrent
-- enqueue may have drawn ids in that range too; the caller keeps the ids it wrote. (A join
-- with the call's ids, to leave those out here, took 20 to 35 ms for 20,000 rows, by the plan
-- PostgreSQL picked, where this range scan takes 8.)
SELECT t.id
  FROM pgidem.tasks t
 WHERE t.id BETWEEN %(first_id)s AND %(last_id)s
   AND pgidem._args_problem(t.args) IS NOT NULL;

-- name: task_args_check
-- Raises PI002 with pgidem._args_problem's message for a task's args (pgidem._check_args): an
-- error in the server, so that it aborts the caller's transaction as pgidem.enqueue_many's does.
SELECT pgidem._check_args(t.args) FROM pgidem.tasks t WHERE t.id = %(task_id)s;

-- name: task_get
SELECT t.id, t.task_name, t.queue, t.state, t.args, t.idempotency_key, t.priority, t.run_at,
       t.attempts, t.max_attempts, t.fencing_token, t.lease_owner, t.lease_expires_at,
       t.last_error, t.created_at, t.started_at, t.finished_at,
       o.state AS outcome_state, o.result AS outcome_result, o.error AS outcome_error,
       o.fencing_token AS outcome_token
  FROM pgidem.tasks t
  LEFT JOIN pgidem.outcomes o ON o.task_id = t.id
 WHERE t.id = %(task_id)s;

-- name: task_attempts
SELECT fencing_token, attempt, worker_id, status, claimed_at, finished_at, error_class,
       error_message
  FROM pgidem.attempts
 WHERE task_id = %(task_id)s
 ORDER BY fencing_token;

-- name: task_claim
-- Claim up to %(limit)s tasks for one worker in one statement (one short transaction):
-- * `rescued`: running tasks whose lease has expired (their worker died or stalled);
-- * `fresh`: queued tasks whose run_at has passed, by priority, then run_at, then id, for the
--   slots the rescue left;
-- both FOR UPDATE SKIP LOCKED, so concurrent workers never wait for nor take the same row.
-- Each claimed task gets a new fencing token from the one sequence, a lease, attempts + 1 and an
-- attempt row; a rescued task's previous attempt becomes `lease_expired`. A rescued task that
-- already used all its attempts goes to `dead` with an outcome instead: a task that kills its
-- worker every time cannot crash workers forever. Only tasks this worker has handlers for.
-- Limits (docs/scheduling.md): a queue with a row in pgidem.queue_limits is not claimed by
-- `fresh` but by `limited`, and only when this transaction holds that row's lock (the
-- `locked` queues, locked by queue_limits_lock in the same transaction just before, so that
-- this statement's snapshot already sees every claim made under the lock before ours). `room`
-- is what the queue's limits leave: max_running minus its running tasks (expired leases
-- included: a rescue takes such a task over without adding to the count), and rate_limit minus
-- the starts of the last rate_period. A queue with a row this worker did not lock (its cache of
-- limited queues is stale) is skipped this time. Rescues are never held back by limits.
-- The lines between `-- <<limits` and `-- limits>>` only do anything when `locked` is not empty:
-- pgidem/_sql.py also gives this statement without them, as task_claim_without_limits, which a
-- worker runs when it locked no queue (PostgreSQL plans it in a third of the time, about 0.27
-- ms instead of 0.75, and a claim is planned afresh each time). The lines between `-- <<rescue`
-- and `-- rescue>>` rescue expired leases: task_claim_without_limits_rescue, without either,
-- is the claim a worker's listener makes for an idle slot on a NOTIFY (new work: the slots'
-- own claims, at least every poll interval, do the rescuing), planned and run in about 0.2 ms
-- less.
WITH limits AS (
    SELECT l.queue, l.max_running, l.rate_limit, l.rate_period, l.max_per_key
      FROM pgidem.queue_limits l
     WHERE l.queue = ANY(%(queues)b::text[])
-- <<limits
), room AS (
    SELECT l.queue, l.max_per_key, l.rate_limit, l.rate_period,
           least(%(limit)s,
                 l.max_running - (SELECT count(*) FROM pgidem.tasks r
                                   WHERE r.state = 'running' AND r.queue = l.queue),
                 l.rate_limit - (SELECT coalesce(sum(s.started), 0) FROM pgidem.queue_starts s
                                  WHERE s.queue = l.queue
                                    AND s.started_at > now() - l.rate_period)) AS room
      FROM limits l
     WHERE l.queue = ANY(%(locked)b::text[])
-- limits>>
-- <<rescue
), rescued AS (
    SELECT t.id
      FROM pgidem.tasks t
     WHERE t.state = 'running' AND t.lease_expires_at < now()
       AND t.queue = ANY(%(queues)b::text[]) AND t.task_name = ANY(%(task_names)b::text[])
     ORDER BY t.lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
-- rescue>>
), fresh AS (
    -- One index scan per queue, in the index's order (tasks_claimable): `queue = ANY(...)` over
    -- the whole table would read and sort every queued row of those queues on each claim. Each
    -- queue's scan stops after `limit` rows; the best of them across queues are kept (the few
    -- extra rows locked stay locked only until this short transaction commits). `run_at +
    -- interval '0'` is not indexable on purpose: as an index condition on tasks_scheduled it
    -- would let the planner read every runnable row and sort them by priority.
    SELECT f.id
      FROM unnest(%(queues)b::text[]) AS q(queue)
      CROSS JOIN LATERAL (
          SELECT t.id, t.priority, t.run_at
            FROM pgidem.tasks t
           WHERE t.state = 'queued' AND t.queue = q.queue AND t.run_at + interval '0' <= now()
             AND t.task_name = ANY(%(task_names)b::text[])
           ORDER BY t.priority DESC, t.run_at, t.id
           LIMIT %(limit)s
             FOR UPDATE SKIP LOCKED
      ) f
     WHERE q.queue NOT IN (SELECT l.queue FROM limits l)
     ORDER BY f.priority DESC, f.run_at, f.id
     LIMIT %(limit)s
-- <<rescue
           - (SELECT count(*) FROM rescued)
-- rescue>>
-- <<limits
), limited_candidates AS (
    -- The first runnable tasks of each locked queue whose key (if any) has a free slot; a few
    -- more than the room, since several may share a key.
    SELECT c.*, r.room, r.max_per_key
      FROM room r
      CROSS JOIN LATERAL (
          SELECT t.id, t.queue, t.concurrency_key, t.priority, t.run_at, k.running AS key_running
            FROM pgidem.tasks t
            CROSS JOIN LATERAL (
                SELECT count(*) AS running FROM pgidem.tasks kt
                 WHERE t.concurrency_key IS NOT NULL AND kt.state = 'running'
                   AND kt.queue = t.queue AND kt.concurrency_key = t.concurrency_key
            ) k
           WHERE t.state = 'queued' AND t.run_at <= now() AND t.queue = r.queue
             AND t.task_name = ANY(%(task_names)b::text[]) AND k.running < r.max_per_key
           ORDER BY t.priority DESC, t.run_at, t.id
           LIMIT greatest(r.room, 0) * 4
      ) c
), limited_pick AS (
    -- Per key no more than its free slots, per queue no more than its room, and in all no more
    -- than the batch has left.
    SELECT p.id
      FROM (SELECT k.id, k.priority, k.run_at, k.room,
                   row_number() OVER (PARTITION BY k.queue
                                      ORDER BY k.priority DESC, k.run_at, k.id) AS queue_rank
              FROM (SELECT c.*,
                           row_number() OVER (PARTITION BY c.queue, c.concurrency_key
                                              ORDER BY c.priority DESC, c.run_at, c.id)
                               AS key_rank
                      FROM limited_candidates c) k
             WHERE k.concurrency_key IS NULL
                OR k.key_rank <= k.max_per_key - k.key_running) p
     WHERE p.queue_rank <= p.room
     ORDER BY p.priority DESC, p.run_at, p.id
     LIMIT %(limit)s
-- <<rescue
           - (SELECT count(*) FROM rescued)
-- rescue>>
           - (SELECT count(*) FROM fresh)
), limited AS (
    -- Under the queue's lock no other claim picks these; SKIP LOCKED only steps over a row that
    -- a cancel or retry holds, and the state is checked again on the locked row.
    SELECT t.id, t.queue
      FROM pgidem.tasks t
     WHERE t.id IN (SELECT id FROM limited_pick) AND t.state = 'queued'
       FOR UPDATE SKIP LOCKED
), starts AS (
    -- The rate limit's ledger: this claim's starts per rate-limited queue at now() (which is
    -- also the attempts' claimed_at); rows older than twice the period and a minute go.
    INSERT INTO pgidem.queue_starts (queue, started_at, started)
    SELECT l.queue, now(), count(*)
      FROM limited l JOIN room r ON r.queue = l.queue
     WHERE r.rate_limit IS NOT NULL
     GROUP BY l.queue
), starts_pruned AS (
    DELETE FROM pgidem.queue_starts s
     USING room r
     WHERE s.queue = r.queue AND r.rate_limit IS NOT NULL
       AND s.started_at < now() - 2 * r.rate_period - interval '1 minute'
-- limits>>
-- <<rescue
), expired_attempts AS (
    UPDATE pgidem.attempts a
       SET status = 'lease_expired', finished_at = now(),
           error_class = 'LeaseExpired',
           error_message = 'the lease expired before the attempt finished (worker died or stalled)'
     WHERE a.task_id = ANY(ARRAY(SELECT id FROM rescued)) AND a.status = 'running'
-- rescue>>
), exhausted AS (
    -- No attempt left: a rescued task whose every attempt lost its lease; and, as a backstop,
    -- a queued one (no path should leave it so; claiming it would break the attempts CHECK and
    -- fail this whole statement, for every worker, for ever).
    UPDATE pgidem.tasks t
       SET state = 'dead', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
           last_error = CASE WHEN t.state = 'running'
                             THEN 'LeaseExpired: the lease expired on every one of its attempts'
                             ELSE 'AttemptsExhausted: no attempt left to run it' END
     WHERE t.id = ANY(ARRAY(SELECT id FROM fresh
-- <<rescue
                            UNION ALL
                            SELECT id FROM rescued
-- rescue>>
-- <<limits
                            UNION ALL
                            SELECT id FROM limited
-- limits>>
                           ))
       AND t.attempts >= t.max_attempts
    RETURNING t.id, t.fencing_token, t.attempts, t.last_error
), exhausted_outcomes AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, error)
    SELECT e.id, coalesce(e.fencing_token, 0), 'dead',
           jsonb_build_object('class', split_part(e.last_error, ':', 1), 'attempts', e.attempts,
                              'message', ltrim(substr(e.last_error,
                                                      strpos(e.last_error, ':') + 1)))
      FROM exhausted e
    ON CONFLICT DO NOTHING
), claimed AS (
    UPDATE pgidem.tasks t
       SET state = 'running', attempts = t.attempts + 1,
           fencing_token = nextval('pgidem.fencing_token_seq'),
           lease_owner = %(worker_id)s,
           lease_expires_at = now() + make_interval(secs => %(lease_s)s),
           started_at = now()
     -- `= ANY(ARRAY(...))`: the planner cannot know how few ids the CTEs give, and with a join
     -- it may scan the whole table (history included) to find a batch; an id array is looked
     -- up in the primary key.
     WHERE t.id = ANY(ARRAY(SELECT id FROM fresh
-- <<rescue
                            UNION ALL
                            SELECT id FROM rescued
-- rescue>>
-- <<limits
                            UNION ALL
                            SELECT id FROM limited
-- limits>>
                           ))
       AND t.id <> ALL(ARRAY(SELECT id FROM exhausted))
    RETURNING t.id, t.task_name, t.queue, t.args, t.idempotency_key, t.priority, t.attempts,
              t.max_attempts, t.fencing_token, t.run_at
), new_attempts AS (
    INSERT INTO pgidem.attempts (fencing_token, task_id, attempt, worker_id)
    SELECT c.fencing_token, c.id, c.attempts, %(worker_id)s FROM claimed c
)
SELECT c.id, c.task_name, c.queue, c.args, c.idempotency_key, c.attempts, c.max_attempts,
       c.fencing_token
  FROM claimed c
 ORDER BY c.priority DESC, c.run_at, c.id;

-- name: task_lock_claims
-- The fence of tasks that are about to write, taken ahead: before the first of them reaches the
-- task's connection, lock the rows of it and of the batch-mates that will likely share its
-- transaction, FOR SHARE, in the transaction itself (not in a savepoint), and say which are still
-- this claim's (token ours, running) or were cancelled. Until COMMIT nothing can change a locked
-- row: a rescue (FOR UPDATE SKIP LOCKED) skips it, a cancel waits, the heartbeat skips it; so each
-- task's completion, written by task_complete_many before COMMIT, is certain when the task
-- starts, and no statement per task is needed to check it. FOR SHARE, not FOR UPDATE, because a
-- step (ctx.step) checks the claim FOR SHARE on a connection of its own while the handler waits
-- for it; and a lock taken by the transaction itself (not a savepoint) and later updated by it
-- stays a plain lock, where one taken in a savepoint would become a MultiXact. `xid` is the
-- transaction's id: if a handler ends the transaction itself, pg_xact_status tells whether the
-- tasks that wrote before it committed.
WITH locked AS MATERIALIZED (
    SELECT t.id, t.fencing_token, t.state
      FROM pgidem.tasks t
     WHERE t.id = ANY(%(task_ids)b::bigint[])
     ORDER BY t.id
       FOR SHARE OF t
)
SELECT i.token,
       (l.fencing_token = i.token AND l.state = 'running') AS current,
       (l.fencing_token = i.token AND l.state = 'cancelled') AS cancelled,
       txid_current() AS xid
  FROM unnest(%(task_ids)b::bigint[], %(tokens)b::bigint[]) AS i(id, token)
  JOIN locked l ON l.id = i.id;


-- name: transaction_status
-- Whether a transaction of this worker committed (after a handler ended it itself).
SELECT txid_status(%(xid)s::bigint) AS status;


-- name: task_mark_succeeded
-- The fence of a task whose handler wrote, checked when it returns, inside its savepoint: the
-- task becomes succeeded if its token is still the claim's and it is still running. Nothing
-- can change the row after this until the transaction ends (a rescue skips locked rows, a
-- cancel waits), so its outcome and attempt are written with the other tasks' by
-- task_record_outcomes just before COMMIT, in the same transaction as its writes. No row:
-- fenced (or cancelled); the caller rolls back to the savepoint. An UPDATE and not a bare
-- FOR UPDATE lock: a row locked inside a savepoint and updated after it by the transaction
-- becomes a MultiXact, which every later reader of the row must look up (GetMultiXactIdMembers
-- took a quarter of the server's time in a drain of writing tasks).
UPDATE pgidem.tasks
   SET state = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
       last_error = NULL
 WHERE id = %(task_id)s AND fencing_token = %(token)s AND state = 'running'
RETURNING id;

-- name: task_record_outcomes
-- The outcomes and finished attempts of the tasks task_mark_succeeded marked in this
-- transaction (their fences were checked there), in one statement just before COMMIT. Returns
-- the ids recorded; the caller rolls the transaction back if one is missing (an outcome already
-- there), so that no task is left succeeded without its outcome.
WITH outcome AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result)
    SELECT i.id, i.token, 'succeeded', i.result
      FROM unnest(%(task_ids)b::bigint[], %(tokens)b::bigint[], %(results)b::jsonb[])
           AS i(id, token, result)
    ON CONFLICT DO NOTHING
    RETURNING task_id, fencing_token
), attempt AS (
    UPDATE pgidem.attempts a
       SET status = 'succeeded', finished_at = now()
     WHERE a.fencing_token = ANY(ARRAY(SELECT fencing_token FROM outcome))
)
SELECT task_id FROM outcome;

-- name: task_complete_many
-- The fenced completions, in the handlers' transaction (the dedupe boundary), of the tasks of
-- one transaction whose handlers never reached the task's connection (nothing to keep or roll
-- back), in one statement just before COMMIT (tasks that wrote go through task_mark_succeeded
-- and task_record_outcomes instead). `locked` locks the given rows by primary key
-- (a lock wait returns the newest row version) and `current_claims` keeps those whose token is
-- still the claim's and which are still running, checked on that locked version. The state test
-- is kept out of the locking scan on purpose: there it let the planner read every running row
-- through tasks_lease_expiry and filter them by id. The outcome is inserted ON CONFLICT DO
-- NOTHING and only the tasks whose outcome went in are marked succeeded, so that the task and
-- its outcome change together or not at all. Returns the ids completed; a task missing from
-- them was fenced (or cancelled) and nothing of it is written.
WITH input AS (
    SELECT i.id, i.token, i.result
      FROM unnest(%(task_ids)b::bigint[], %(tokens)b::bigint[], %(results)b::jsonb[])
           AS i(id, token, result)
), locked AS MATERIALIZED (
    SELECT t.id, t.fencing_token, t.state
      FROM pgidem.tasks t
     WHERE t.id = ANY(%(task_ids)b::bigint[])
     ORDER BY t.id
       FOR UPDATE OF t
), current_claims AS (
    SELECT l.id, i.token, i.result
      FROM locked l
      JOIN input i ON i.id = l.id AND i.token = l.fencing_token
     WHERE l.state = 'running'
), outcome AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result)
    SELECT c.id, c.token, 'succeeded', c.result FROM current_claims c
    ON CONFLICT DO NOTHING
    RETURNING task_id, fencing_token
), done AS (
    UPDATE pgidem.tasks t
       SET state = 'succeeded', finished_at = now(), lease_owner = NULL,
           lease_expires_at = NULL, last_error = NULL
     WHERE t.id = ANY(ARRAY(SELECT task_id FROM outcome))
), attempt AS (
    UPDATE pgidem.attempts a
       SET status = 'succeeded', finished_at = now()
     WHERE a.fencing_token = ANY(ARRAY(SELECT fencing_token FROM outcome))
)
SELECT task_id FROM outcome;

-- name: task_retry_later
-- A failed attempt whose task may run again: back to queued at run_at, fenced on the token.
-- Returns one row when the token was still current.
WITH t AS (
    UPDATE pgidem.tasks
       SET state = 'queued', run_at = now() + make_interval(secs => %(delay_s)s),
           lease_owner = NULL, lease_expires_at = NULL, last_error = %(last_error)s
     WHERE id = %(task_id)s AND fencing_token = %(token)s AND state = 'running'
    RETURNING id
), a AS (
    UPDATE pgidem.attempts
       SET status = %(attempt_status)s, finished_at = now(), error_class = %(error_class)s,
           error_message = %(error_message)s, error_traceback = %(error_traceback)s
     WHERE fencing_token = %(token)s AND status = 'running'
)
SELECT id FROM t;

-- name: task_kill
-- A failed attempt whose task may not run again: dead, with the final error as its outcome.
WITH t AS (
    UPDATE pgidem.tasks
       SET state = 'dead', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
           last_error = %(last_error)s
     WHERE id = %(task_id)s AND fencing_token = %(token)s AND state = 'running'
    RETURNING id
), o AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, error)
    SELECT t.id, %(token)s, 'dead', %(error)s::jsonb FROM t
    ON CONFLICT DO NOTHING
), a AS (
    UPDATE pgidem.attempts
       SET status = %(attempt_status)s, finished_at = now(), error_class = %(error_class)s,
           error_message = %(error_message)s, error_traceback = %(error_traceback)s
     WHERE fencing_token = %(token)s AND status = 'running'
)
SELECT id FROM t;

-- name: attempt_finish_unfenced
-- How an attempt ended when its task's token was no longer current (or the task was
-- cancelled): only the attempt row changes, and only while it is still open (or was marked
-- lease_expired by the rescue that took the task away).
UPDATE pgidem.attempts
   SET status = %(status)s, finished_at = now(),
       error_class = coalesce(%(error_class)s, error_class),
       error_message = coalesce(%(error_message)s, error_message),
       error_traceback = coalesce(%(error_traceback)s, error_traceback)
 WHERE fencing_token = ANY(%(tokens)b::bigint[]) AND status IN ('running', 'lease_expired');

-- name: lease_extend
-- The heartbeat: extend every lease this worker holds in one statement, only where the token is
-- still current and the task still running. SKIP LOCKED because a row locked by this worker's own
-- open completion transaction must not make the heartbeat wait (or deadlock with it); such a
-- row is still ours. Returns each token with `current` (false: the lease is lost),
-- `cancelled` (the task was cancelled while this claim ran it) and `extended` (its lease was
-- moved: false for a row skipped as locked).
WITH wanted AS (
    SELECT w.id, w.token
      FROM unnest(%(task_ids)b::bigint[], %(tokens)b::bigint[]) AS w(id, token)
), lockable AS (
    SELECT t.id
      FROM pgidem.tasks t JOIN wanted w ON t.id = w.id AND t.fencing_token = w.token
     WHERE t.state = 'running'
       FOR UPDATE OF t SKIP LOCKED
), extended AS (
    UPDATE pgidem.tasks t
       SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
      FROM lockable l
     WHERE t.id = l.id
    RETURNING t.id
)
SELECT w.token,
       coalesce(t.fencing_token = w.token AND t.state = 'running', false) AS current,
       coalesce(t.fencing_token = w.token AND t.state = 'cancelled', false) AS cancelled,
       w.id IN (SELECT id FROM extended) AS extended
  FROM wanted w
  LEFT JOIN pgidem.tasks t ON t.id = w.id;

-- name: lease_release
-- Shutdown: give back the leases of claimed tasks that never started, as if never claimed: the
-- attempt is not counted and its row goes away.
WITH t AS (
    UPDATE pgidem.tasks t
       SET state = 'queued', attempts = t.attempts - 1, lease_owner = NULL,
           lease_expires_at = NULL
      FROM unnest(%(task_ids)b::bigint[], %(tokens)b::bigint[]) AS w(id, token)
     WHERE t.id = w.id AND t.fencing_token = w.token AND t.state = 'running'
    RETURNING t.id, t.fencing_token, t.queue
), a AS (
    DELETE FROM pgidem.attempts a USING t WHERE a.fencing_token = t.fencing_token
), n AS (
    SELECT pg_notify('pgidem', q.queue) FROM (SELECT DISTINCT queue FROM t) q
)
SELECT (SELECT count(*) FROM t) AS released, (SELECT count(*) FROM n) AS notified;

-- name: worker_register
INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(queues)b::text[], %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: worker_heartbeat
-- Also re-registers a worker whose row was removed (pruned as stale while it was cut off).
INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(queues)b::text[], %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: worker_deregister
DELETE FROM pgidem.workers WHERE id = %(worker_id)s;

-- name: worker_prune_stale
-- Workers whose heartbeat is older than the given age are gone; their tasks are rescued by the
-- claim path when their leases expire, so only the registry row is removed here.
DELETE FROM pgidem.workers WHERE heartbeat_at < now() - make_interval(secs => %(age_s)s);

-- name: next_run_at
-- When the earliest scheduled task of these queues becomes runnable (an idle worker sleeps
-- until then, or a NOTIFY, instead of polling). Per queue, a scan of tasks_scheduled
-- (run_at, queue) from now() that stops at the queue's first entry (it steps over the future
-- tasks of other queues that come before it): `queue = ANY(...)` with min(run_at) over
-- tasks_claimable would read every queued row of those queues (it orders by priority first).
SELECT min(n.run_at) AS run_at
  FROM unnest(%(queues)b::text[]) AS q(queue)
  CROSS JOIN LATERAL (
      SELECT t.run_at
        FROM pgidem.tasks t
       WHERE t.state = 'queued' AND t.queue = q.queue AND t.run_at > now()
       ORDER BY t.run_at
       LIMIT 1
  ) n;

-- name: key_retention
-- The database's key retention (pgidem.key_retention, 7 days when unset), in seconds: the
-- scheduler never catches up a tick older than this (its task may have been pruned).
SELECT extract(epoch FROM pgidem.key_retention())::float8 AS seconds;

-- name: schedule_upsert
-- A scheduler records a periodic schedule it runs (pgidem.schedules, for people). One statement
-- per schedule, so several schedulers never deadlock; last_tick (and its task) only moves
-- forward, whichever scheduler writes last.
INSERT INTO pgidem.schedules AS s (name, task_name, cron, timezone, queue, last_tick,
                                   last_task_id, next_tick, updated_at)
VALUES (%(name)s, %(task_name)s, %(cron)s, %(timezone)s, %(queue)s, %(last_tick)s,
        %(last_task_id)s, %(next_tick)s, now())
ON CONFLICT (name) DO UPDATE
   SET task_name = EXCLUDED.task_name, cron = EXCLUDED.cron, timezone = EXCLUDED.timezone,
       queue = EXCLUDED.queue,
       last_tick = CASE WHEN s.last_tick IS NULL OR EXCLUDED.last_tick > s.last_tick
                        THEN EXCLUDED.last_tick ELSE s.last_tick END,
       last_task_id = CASE WHEN s.last_tick IS NULL OR EXCLUDED.last_tick > s.last_tick
                           THEN EXCLUDED.last_task_id ELSE s.last_task_id END,
       next_tick = greatest(s.next_tick, EXCLUDED.next_tick),
       updated_at = now();

-- name: schedule_list
-- The periodic schedules for `pgidem status`, with how long ago a scheduler last recorded each.
SELECT name, task_name, cron, timezone, queue, last_tick, last_task_id, next_tick,
       extract(epoch FROM now() - updated_at)::float8 AS updated_age_s
  FROM pgidem.schedules
 ORDER BY name;

-- name: task_cancel
SELECT pgidem.cancel(%(task_id)s) AS previous;

-- name: task_retry
SELECT pgidem.retry(%(task_id)s) AS previous;

-- name: queue_status
SELECT queue, available, scheduled, running, succeeded, dead, cancelled,
       extract(epoch FROM oldest_available_age)::float8 AS oldest_available_s
  FROM pgidem.queue_stats
 ORDER BY queue;

-- name: workers_live
SELECT id, hostname, pid, queues, concurrency, started_at, heartbeat_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
  FROM pgidem.workers
 ORDER BY started_at;

-- name: task_prune
-- One batch of pruning (see pgidem.prune); the caller loops, one transaction per batch.
SELECT pgidem.prune(%(older_than)s::interval, %(batch_size)s::integer) AS deleted;

-- ============================================================================================
-- Stability run (`pgidem stability`, `pgidem demo`; pgidem/_stability.py). The run works in a
-- scratch database of its own; `{name}` placeholders are identifiers filled in with
-- psycopg.sql, never from user text other than the generated scratch name.

-- name: stability_database_create
-- The run's scratch database (the only database a stability run creates or drops).
CREATE DATABASE {dbname}

-- name: stability_database_drop
-- Drop the scratch database at the end; FORCE ends connections a killed worker left behind.
DROP DATABASE IF EXISTS {dbname} WITH (FORCE)

-- name: stability_data_directory
-- Where the server keeps its data: a --data-dir must name this server's, or no server faults.
SELECT current_setting('data_directory') AS data_directory

-- name: stability_ledger_create
-- The workload's ledger: deliberately NO unique constraint on task or key, so a duplicate
-- write would show as a second row instead of an error.
CREATE TABLE public.pgidem_stability_ledger (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id       bigint      NOT NULL,
    key           text        NOT NULL,
    fencing_token bigint      NOT NULL,
    charge_id     text        NOT NULL,
    amount        integer     NOT NULL,
    written_at    timestamptz NOT NULL DEFAULT now()
)

-- name: stability_ledger_insert
-- The handler's write (through ctx.conn: it commits with the fenced completion or not at all).
INSERT INTO public.pgidem_stability_ledger (task_id, key, fencing_token, charge_id, amount)
VALUES (%(task_id)s, %(key)s, %(fencing_token)s, %(charge_id)s, %(amount)s)

-- name: stability_progress
-- The live progress line: how many of the run's tasks exist, have succeeded, are running.
SELECT count(*) AS tasks,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state IN ('succeeded', 'dead', 'cancelled')) AS finished
  FROM pgidem.tasks
 WHERE task_name = %(task_name)s

-- name: stability_held_tasks
-- Which running tasks each worker process holds (by pid, through the worker registry), and
-- whether the claim's handler has started (it opened its charge step's call marker).
SELECT t.id, t.fencing_token, w.pid,
       EXISTS (SELECT 1 FROM pgidem.step_calls c
                WHERE c.task_id = t.id AND c.fencing_token = t.fencing_token) AS started
  FROM pgidem.tasks t
  JOIN pgidem.workers w ON w.id = t.lease_owner
 WHERE t.state = 'running' AND t.task_name = %(task_name)s

-- name: stability_task_tokens
-- The current token and state of some tasks (a paused worker's tasks: were they re-claimed?).
SELECT id, fencing_token, state FROM pgidem.tasks WHERE id = ANY(%(ids)b::bigint[])

-- name: stability_attempt_statuses
-- How some attempts ended (a paused worker's stale attempts: were they refused?).
SELECT fencing_token, task_id, status FROM pgidem.attempts
 WHERE fencing_token = ANY(%(tokens)b::bigint[])

-- name: stability_terminate_backends
-- The pg_terminate_backend fault: end every connection of one worker process, in the scratch
-- database only. A worker names its connections `pgidem:<worker id>` (application_name, 63
-- bytes at most); the registry gives the ids of that pid. The name the run put in the worker's
-- DSN is matched too, for connections that keep it.
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) AS terminated
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
   AND (a.application_name = %(application_name)s
        OR a.application_name IN (SELECT left('pgidem:' || w.id, 63)
                                    FROM pgidem.workers w WHERE w.pid = %(pid)s))

-- name: stability_task_report
-- The checker's view of every task of the run: its state and outcome, how many outcomes,
-- ledger rows and attempts of each kind it has, and the tokens of each.
SELECT t.id, t.idempotency_key AS key, t.state, t.attempts, t.fencing_token, t.lease_owner,
       o.fencing_token AS outcome_token, o.state AS outcome_state, o.result AS outcome_result,
       (SELECT count(*) FROM pgidem.outcomes o2 WHERE o2.task_id = t.id) AS outcomes,
       coalesce(l.rows, 0) AS ledger_rows, l.tokens AS ledger_tokens, l.charge_ids,
       coalesce(a.total, 0) AS attempt_rows, coalesce(a.succeeded, 0) AS succeeded_attempts,
       a.succeeded_tokens, coalesce(a.fenced, 0) AS fenced_attempts,
       coalesce(a.running, 0) AS running_attempts
  FROM pgidem.tasks t
  LEFT JOIN pgidem.outcomes o ON o.task_id = t.id
  LEFT JOIN LATERAL (
      SELECT count(*) AS rows, array_agg(x.fencing_token ORDER BY x.id) AS tokens,
             array_agg(x.charge_id ORDER BY x.id) AS charge_ids
        FROM public.pgidem_stability_ledger x WHERE x.task_id = t.id
  ) l ON true
  LEFT JOIN LATERAL (
      SELECT count(*) AS total,
             count(*) FILTER (WHERE y.status = 'succeeded') AS succeeded,
             array_agg(y.fencing_token) FILTER (WHERE y.status = 'succeeded') AS succeeded_tokens,
             count(*) FILTER (WHERE y.status = 'fenced') AS fenced,
             count(*) FILTER (WHERE y.status = 'running') AS running
        FROM pgidem.attempts y WHERE y.task_id = t.id
  ) a ON true
 WHERE t.task_name = %(task_name)s
 ORDER BY t.id

-- name: stability_keys_with_many_tasks
-- Keys that have more than one task (the unique index should make this impossible).
SELECT idempotency_key AS key, count(*) AS tasks
  FROM pgidem.tasks
 WHERE task_name = %(task_name)s
 GROUP BY idempotency_key
HAVING count(*) > 1

-- name: stability_fenced_ledger_rows
-- Ledger rows written by an attempt that did not succeed (stale, fenced, killed): each one is a
-- write that escaped its transaction.
SELECT l.task_id, l.fencing_token, coalesce(a.status, 'no attempt row') AS status
  FROM public.pgidem_stability_ledger l
  LEFT JOIN pgidem.attempts a ON a.fencing_token = l.fencing_token
 WHERE a.status IS DISTINCT FROM 'succeeded'

-- name: stability_attempt_summary
-- How the run's attempts ended, by status.
SELECT a.status, count(*) AS attempts
  FROM pgidem.attempts a JOIN pgidem.tasks t ON t.id = a.task_id
 WHERE t.task_name = %(task_name)s
 GROUP BY a.status
 ORDER BY a.status

-- name: stability_worker_pids
-- The worker registry: which pid each worker id has (to tell a live owner from a dead one).
SELECT id, pid FROM pgidem.workers

-- effects ----------------------------------------------------------------------------------------
-- ctx.step, ctx.once, ctx.fence, outcome lookup and pruning (migration 0002_effects).

-- name: step_begin
-- Before a step's fn runs, in its own short transaction (autocommit, not the task's): return the
-- step's record if one exists, and write this attempt's call marker, `replayed` when there is a
-- record, else `calling` (the trace left if the worker dies before the record). The marker is
-- written only while the claim is current (token ours, task running); FOR SHARE makes a
-- concurrent rescue wait for this short statement or be seen by it (the row is re-checked after
-- the wait), never slip in between the check and the insert. `current` false and no record:
-- the caller must not call fn (LeaseLost).
WITH recorded AS (
    SELECT s.result, s.fencing_token, s.attempt
      FROM pgidem.steps s
     WHERE s.task_id = %(task_id)s AND s.name = %(name)s
), current_claim AS (
    SELECT t.id
      FROM pgidem.tasks t
     WHERE t.id = %(task_id)s AND t.fencing_token = %(token)s AND t.state = 'running'
       FOR SHARE
), call AS (
    INSERT INTO pgidem.step_calls (task_id, fencing_token, attempt, name, step_key, status,
                                   finished_at)
    SELECT c.id, %(token)s, %(attempt)s, %(name)s, %(step_key)s,
           CASE WHEN EXISTS (SELECT 1 FROM recorded) THEN 'replayed' ELSE 'calling' END,
           CASE WHEN EXISTS (SELECT 1 FROM recorded) THEN now() END
      FROM current_claim c
    RETURNING id
)
SELECT (SELECT id FROM call) AS call_id,
       EXISTS (SELECT 1 FROM current_claim) AS current,
       EXISTS (SELECT 1 FROM recorded) AS recorded,
       r.result AS recorded_result, r.fencing_token AS recorded_token,
       r.attempt AS recorded_attempt
  FROM (SELECT 1) AS one
  LEFT JOIN recorded r ON true;

-- name: step_record
-- After fn returned, in its own short transaction: record the step's result, fenced like a
-- completion (only while the token is ours and the task running, FOR SHARE as in step_begin),
-- ON CONFLICT DO NOTHING on (task, name); finish the call marker as `recorded`, or `refused`
-- when the claim is no longer current (the caller raises LeaseLost: a stale worker cannot
-- record a step). `existing_result` is the record that was there already, if any (the first
-- record wins, as for outcomes).
WITH current_claim AS (
    SELECT t.id
      FROM pgidem.tasks t
     WHERE t.id = %(task_id)s AND t.fencing_token = %(token)s AND t.state = 'running'
       FOR SHARE
), ins AS (
    INSERT INTO pgidem.steps (task_id, name, step_key, fencing_token, attempt, result)
    SELECT c.id, %(name)s, %(step_key)s, %(token)s, %(attempt)s, %(result)s::jsonb
      FROM current_claim c
    ON CONFLICT (task_id, name) DO NOTHING
    RETURNING task_id
), existing AS (
    SELECT s.result FROM pgidem.steps s WHERE s.task_id = %(task_id)s AND s.name = %(name)s
), call AS (
    UPDATE pgidem.step_calls
       SET status = CASE WHEN NOT EXISTS (SELECT 1 FROM current_claim) THEN 'refused'
                         WHEN EXISTS (SELECT 1 FROM ins) THEN 'recorded'
                         ELSE 'replayed' END,
           finished_at = now()
     WHERE id = %(call_id)s
)
SELECT EXISTS (SELECT 1 FROM current_claim) AS current,
       EXISTS (SELECT 1 FROM ins) AS inserted,
       EXISTS (SELECT 1 FROM existing) AS had_record,
       (SELECT result FROM existing) AS existing_result;

-- name: step_fail
-- fn raised (or returned something that is not JSON): keep the error on this attempt's call.
-- Not fenced: it is history of what this attempt did, like the attempt row.
UPDATE pgidem.step_calls
   SET status = 'failed', finished_at = now(), error_class = %(error_class)s,
       error_message = %(error_message)s
 WHERE id = %(call_id)s AND status = 'calling';

-- name: task_steps
-- `pgidem show`: the recorded steps of a task.
SELECT name, step_key, fencing_token, attempt, result, recorded_at
  FROM pgidem.steps
 WHERE task_id = %(task_id)s
 ORDER BY recorded_at, name;

-- name: task_step_history
-- `pgidem show`: every step call of every attempt of a task, oldest first, with its summary.
SELECT call_id, attempt, fencing_token, worker_id, step, step_key, status, effective_status,
       attempt_status, called_at, finished_at, error_class, error_message, summary
  FROM pgidem.step_history
 WHERE task_id = %(task_id)s
 ORDER BY call_id;

-- name: once_claim
-- ctx.once(key), on the task's connection inside its transaction: true the first time.
SELECT pgidem.once(%(key)s::text, %(task_id)s::bigint, %(token)s::bigint) AS first;

-- name: fence_advance
-- ctx.fence(resource), on the task's connection inside its transaction: advance the resource's
-- fence to this claim's token unless a newer token was seen; say whether it was accepted.
SELECT pgidem.fence_advance(%(resource)s::text, %(token)s::bigint) AS accepted;

-- name: task_outcome_by_key
-- App.find(): a task's state and outcome by (task name, idempotency key).
SELECT task_id, task_name, idempotency_key, state, attempts, max_attempts, outcome_state,
       result, error, finished_at
  FROM pgidem.outcome_of(%(task_name)s::text, %(idempotency_key)s::text);

-- name: prune_batch
-- One batch of pruning (see pgidem.prune_batch): autocommit, so one short transaction.
SELECT tasks_deleted, once_keys_deleted
  FROM pgidem.prune_batch(%(older_than)s::interval, %(batch_size)s::integer);

-- name: prune_pending
-- `pgidem prune --dry-run`: how many finished tasks and once keys are older than the retention.
-- Uses the tasks_finished and once_keys_created indexes.
SELECT (SELECT count(*) FROM pgidem.tasks t
         WHERE t.state IN ('succeeded', 'dead', 'cancelled')
           AND t.finished_at < now() - coalesce(%(older_than)s::interval,
                                                pgidem.key_retention())) AS tasks,
       (SELECT count(*) FROM pgidem.once_keys k
         WHERE k.created_at < now() - coalesce(%(older_than)s::interval,
                                               pgidem.key_retention())) AS once_keys;

-- ============================================================================================
-- control: queue limits, concurrency keys, periodic tasks (docs/scheduling.md).

-- name: claim_begin
-- The claim of a limited queue is a transaction of its own: lock the limit rows, then claim.
-- READ COMMITTED whatever the server's default, because the claim statement must take a fresh
-- snapshot after the locks are granted (under REPEATABLE READ it would count running tasks as
-- of the BEGIN, before the previous lock holder's claim).
BEGIN ISOLATION LEVEL READ COMMITTED;

-- name: queue_limits_lock
-- Lock the limit rows of these queues for the rest of the claim transaction, in queue order (so
-- that workers locking several never deadlock); returns the queues locked. Claims of the same
-- limited queue take turns here, for the milliseconds of one claim; unlimited queues have no
-- row and take no lock.
SELECT queue
  FROM pgidem.queue_limits
 WHERE queue = ANY(%(queues)b::text[])
 ORDER BY queue
   FOR UPDATE;

-- name: queue_limits_of
-- Which of these queues have a limits row (the worker's cache of which claims need the lock;
-- refreshed at each heartbeat).
SELECT queue FROM pgidem.queue_limits WHERE queue = ANY(%(queues)b::text[]) ORDER BY queue;

-- name: queue_limit_set
SELECT pgidem.set_queue_limit(%(queue)s::text, %(max_running)s::integer,
                              %(rate_limit)s::integer, %(rate_period)s::interval,
                              %(max_per_key)s::integer);

-- name: queue_limits_list
-- Every queue with a limits row, with what it uses now: running tasks and the starts of the
-- rate limit's current period (for `pgidem status` and `pgidem limits`).
SELECT queue, max_running, rate_limit,
       extract(epoch FROM rate_period)::float8 AS rate_period_s, max_per_key, running,
       started_in_period
  FROM pgidem.queue_stats
 WHERE queue IN (SELECT l.queue FROM pgidem.queue_limits l)
 ORDER BY queue;

-- name: task_enqueue_keyed
-- Enqueue with a concurrency key (pgidem.enqueue_keyed: pgidem.enqueue plus the key).
SELECT pgidem.enqueue_keyed(%(task_name)s::text, %(args)s::jsonb, %(queue)s::text,
                      %(idempotency_key)s::text, %(run_at)s::timestamptz, %(priority)s::integer,
                      %(max_attempts)s::integer, %(concurrency_key)s::text) AS id;

-- name: task_control
-- What `pgidem show` adds about control: the task's concurrency key and its queue's limits.
SELECT t.concurrency_key, l.max_running, l.rate_limit,
       extract(epoch FROM l.rate_period)::float8 AS rate_period_s, l.max_per_key
  FROM pgidem.tasks t
  LEFT JOIN pgidem.queue_limits l ON l.queue = t.queue
 WHERE t.id = %(task_id)s;
