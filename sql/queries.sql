-- Every query pgidem's runtime code issues, each under a name (`-- name: <name>`). Python refers
-- to them by name through pgidem/_sql.py; parameters are psycopg's named placeholders.

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
-- Bulk enqueue, one round trip per batch: arrays in, (position, id) out.
SELECT ord, id
  FROM pgidem.enqueue_many(%(task_name)s::text, %(args)s::jsonb[], %(queue)s::text,
                           %(idempotency_keys)s::text[], %(run_at)s::timestamptz,
                           %(priority)s::integer, %(max_attempts)s::integer)
 ORDER BY ord;

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
WITH rescued AS (
    SELECT t.id
      FROM pgidem.tasks t
     WHERE t.state = 'running' AND t.lease_expires_at < now()
       AND t.queue = ANY(%(queues)s::text[]) AND t.task_name = ANY(%(task_names)s::text[])
     ORDER BY t.lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), fresh AS (
    SELECT t.id
      FROM pgidem.tasks t
     WHERE t.state = 'queued' AND t.run_at <= now()
       AND t.queue = ANY(%(queues)s::text[]) AND t.task_name = ANY(%(task_names)s::text[])
     ORDER BY t.priority DESC, t.run_at, t.id
     LIMIT (SELECT %(limit)s - count(*) FROM rescued)
       FOR UPDATE SKIP LOCKED
), expired_attempts AS (
    UPDATE pgidem.attempts a
       SET status = 'lease_expired', finished_at = now(),
           error_class = 'LeaseExpired',
           error_message = 'the lease expired before the attempt finished (worker died or stalled)'
      FROM rescued r
     WHERE a.task_id = r.id AND a.status = 'running'
), exhausted AS (
    UPDATE pgidem.tasks t
       SET state = 'dead', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
           last_error = 'LeaseExpired: the lease expired on every one of its attempts'
      FROM rescued r
     WHERE t.id = r.id AND t.attempts >= t.max_attempts
    RETURNING t.id, t.fencing_token, t.attempts
), exhausted_outcomes AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, error)
    SELECT e.id, e.fencing_token, 'dead',
           jsonb_build_object('class', 'LeaseExpired', 'attempts', e.attempts,
                              'message', 'the lease expired on every one of its attempts')
      FROM exhausted e
    ON CONFLICT DO NOTHING
), claimed AS (
    UPDATE pgidem.tasks t
       SET state = 'running', attempts = t.attempts + 1,
           fencing_token = nextval('pgidem.fencing_token_seq'),
           lease_owner = %(worker_id)s,
           lease_expires_at = now() + make_interval(secs => %(lease_s)s),
           started_at = now()
     WHERE t.id IN (SELECT id FROM fresh
                    UNION ALL
                    SELECT r.id FROM rescued r
                     WHERE r.id NOT IN (SELECT id FROM exhausted))
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

-- name: task_complete
-- The fenced completion, run in the handler's transaction: succeed only where the token is still
-- this claim's and the task still running; record the outcome ON CONFLICT DO NOTHING (the dedupe
-- boundary); finish the attempt. Returns one row when all of it happened, none when fenced.
WITH done AS (
    UPDATE pgidem.tasks
       SET state = 'succeeded', finished_at = now(), lease_owner = NULL,
           lease_expires_at = NULL, last_error = NULL
     WHERE id = %(task_id)s AND fencing_token = %(token)s AND state = 'running'
    RETURNING id
), outcome AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result)
    SELECT d.id, %(token)s, 'succeeded', %(result)s::jsonb FROM done d
    ON CONFLICT DO NOTHING
    RETURNING task_id
), attempt AS (
    UPDATE pgidem.attempts
       SET status = 'succeeded', finished_at = now()
     WHERE fencing_token = %(token)s AND task_id IN (SELECT task_id FROM outcome)
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
 WHERE fencing_token = ANY(%(tokens)s::bigint[]) AND status IN ('running', 'lease_expired');

-- name: lease_extend
-- The heartbeat: extend every lease this worker holds in one statement, only where the token is
-- still current and the task still running. SKIP LOCKED because a row locked by this worker's own
-- open completion transaction must not make the heartbeat wait (or deadlock with it); such a
-- row is still ours. Returns each token with `current` (false: the lease is lost) and
-- `cancelled` (the task was cancelled while this claim ran it).
WITH wanted AS (
    SELECT w.id, w.token
      FROM unnest(%(task_ids)s::bigint[], %(tokens)s::bigint[]) AS w(id, token)
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
       coalesce(t.fencing_token = w.token AND t.state = 'cancelled', false) AS cancelled
  FROM wanted w
  LEFT JOIN pgidem.tasks t ON t.id = w.id;

-- name: lease_release
-- Shutdown: give back the leases of claimed tasks that never started, as if never claimed: the
-- attempt is not counted and its row goes away.
WITH t AS (
    UPDATE pgidem.tasks t
       SET state = 'queued', attempts = t.attempts - 1, lease_owner = NULL,
           lease_expires_at = NULL
      FROM unnest(%(task_ids)s::bigint[], %(tokens)s::bigint[]) AS w(id, token)
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
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(queues)s::text[], %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: worker_heartbeat
-- Also re-registers a worker whose row was removed (pruned as stale while it was cut off).
INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency)
VALUES (%(worker_id)s, %(hostname)s, %(pid)s, %(queues)s::text[], %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();

-- name: worker_deregister
DELETE FROM pgidem.workers WHERE id = %(worker_id)s;

-- name: worker_prune_stale
-- Workers whose heartbeat is older than the given age are gone; their tasks are rescued by the
-- claim path when their leases expire, so only the registry row is removed here.
DELETE FROM pgidem.workers WHERE heartbeat_at < now() - make_interval(secs => %(age_s)s);

-- name: next_run_at
-- When the earliest scheduled task of these queues becomes runnable (the worker sleeps until
-- then instead of polling every row). Uses the tasks_claimable index.
SELECT min(run_at) AS run_at
  FROM pgidem.tasks
 WHERE state = 'queued' AND queue = ANY(%(queues)s::text[]) AND run_at > now();

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
