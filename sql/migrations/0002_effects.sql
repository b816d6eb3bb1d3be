-- 0002_effects: effects outside the database. The history of every ctx.step call
-- (pgidem.step_calls and the view pgidem.step_history), the fence and once-key functions
-- (pgidem.fence_advance, pgidem.once), outcome lookup (pgidem.outcome_of) and pruning that
-- reports once keys too (pgidem.prune_batch; pgidem.prune now counts them).
--
-- Errors raised here use SQLSTATE PI002 (invalid input), like 0001.

-- One row per call of ctx.step(name, fn) by one attempt: written as `calling` in its own short
-- transaction *before* fn runs, and finished after it, so that a worker that dies between the
-- external call and the step record leaves a trace (`calling` on an attempt that has ended: the
-- view below says `not_recorded`). pgidem.steps holds the recorded results; this table holds
-- what each attempt did about them. Statuses:
--   calling   the marker: fn was (about to be) called and nothing came back yet
--   recorded  fn returned and its result is the step's record in pgidem.steps
--   replayed  a record existed already: its result was returned without calling fn
--   failed    fn raised (or returned something that is not JSON): error_class/error_message
--   refused   fn returned but the record was refused: this claim's token was no longer current
CREATE TABLE pgidem.step_calls (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id       bigint      NOT NULL REFERENCES pgidem.tasks (id) ON DELETE CASCADE,
    fencing_token bigint      NOT NULL,
    attempt       integer     NOT NULL,
    name          text        NOT NULL,
    step_key      text        NOT NULL,
    status        text        NOT NULL DEFAULT 'calling',
    called_at     timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    error_class   text,
    error_message text,
    CONSTRAINT step_calls_status_valid
        CHECK (status IN ('calling', 'recorded', 'replayed', 'failed', 'refused')),
    CONSTRAINT step_calls_finished_has_time
        CHECK (status = 'calling' OR finished_at IS NOT NULL),
    CONSTRAINT step_calls_name_valid
        CHECK (length(name) BETWEEN 1 AND 200)
);
-- `pgidem show`, the view and the cascade from a pruned task go from a task to its calls.
CREATE INDEX step_calls_task ON pgidem.step_calls (task_id, id);

-- Pruning deletes once keys by age; without this it would scan the whole ledger every batch.
CREATE INDEX once_keys_created ON pgidem.once_keys (created_at);

-- For people in psql: every step call with its attempt, and in plain words what happened.
-- `effective_status` is `not_recorded` for a call whose attempt ended while the call was still
-- `calling`: the external system may have acted, and the next attempt called it again with the
-- same key.
CREATE VIEW pgidem.step_history AS
SELECT c.id AS call_id, c.task_id, c.attempt, c.fencing_token, a.worker_id, c.name AS step,
       c.step_key,
       c.status,
       CASE WHEN c.status = 'calling' AND coalesce(a.status, 'gone') <> 'running'
            THEN 'not_recorded' ELSE c.status END AS effective_status,
       a.status AS attempt_status, c.called_at, c.finished_at, c.error_class, c.error_message,
       format('step %s on attempt %s (token %s): %s', quote_ident(c.name), c.attempt,
              c.fencing_token,
              CASE
                  WHEN c.status = 'calling' AND coalesce(a.status, 'gone') <> 'running'
                      THEN format('called, not recorded (the attempt ended %s before the '
                                  'result was recorded; the next attempt calls again with the '
                                  'same key)', coalesce(a.status, 'unknown'))
                  WHEN c.status = 'calling' THEN 'being called'
                  WHEN c.status = 'recorded' THEN 'called and recorded'
                  WHEN c.status = 'replayed' THEN 'replayed from its record, not called'
                  WHEN c.status = 'failed'
                      THEN format('failed: %s: %s', c.error_class, c.error_message)
                  ELSE 'called, but its record was refused (the token was no longer current)'
              END) AS summary
  FROM pgidem.step_calls c
  LEFT JOIN pgidem.attempts a ON a.fencing_token = c.fencing_token;

-- Advance the fence of a downstream resource to `token` if it is not older than the highest
-- token seen for that resource; say whether it was accepted. An equal token is accepted (the
-- same claim may pass twice). Race-safe without locks of its own: the upsert's conflict path
-- takes the row lock and re-checks the WHERE on the latest committed row, so concurrent callers
-- serialise and the stored token never decreases. Inside a transaction, the advance commits or
-- rolls back with it (and holds the row until then).
CREATE FUNCTION pgidem.fence_advance(resource text, token bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    accepted boolean;
BEGIN
    IF fence_advance.resource IS NULL OR length(fence_advance.resource) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'invalid fence resource: it must be 1 to 255 characters (got %)',
            coalesce(length(fence_advance.resource)::text, 'NULL')
            USING ERRCODE = 'PI002', COLUMN = 'resource';
    END IF;
    IF fence_advance.token IS NULL THEN
        RAISE EXCEPTION 'invalid fencing token: NULL' USING ERRCODE = 'PI002', COLUMN = 'token';
    END IF;
    INSERT INTO pgidem.fences AS f (resource, token)
    VALUES (fence_advance.resource, fence_advance.token)
    ON CONFLICT (resource) DO UPDATE
       SET token = EXCLUDED.token, updated_at = now()
     WHERE f.token <= EXCLUDED.token
    RETURNING true INTO accepted;
    RETURN coalesce(accepted, false);
END
$$;

-- The dedupe ledger from SQL: insert `key` unless it is there; true the first time. Call it
-- inside the transaction that makes the effect: it commits or rolls back with it, and a
-- concurrent caller of the same key waits for that outcome (then gets false after a commit, or
-- true after a rollback). task_id and fencing_token are kept for people reading the ledger.
CREATE FUNCTION pgidem.once(key text, task_id bigint DEFAULT NULL, fencing_token bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    first boolean;
BEGIN
    IF once.key IS NULL OR length(once.key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'invalid once key: it must be 1 to 255 characters (got %)',
            coalesce(length(once.key)::text, 'NULL')
            USING ERRCODE = 'PI002', COLUMN = 'key';
    END IF;
    INSERT INTO pgidem.once_keys (key, task_id, fencing_token)
    VALUES (once.key, once.task_id, once.fencing_token)
    ON CONFLICT (key) DO NOTHING
    RETURNING true INTO first;
    RETURN coalesce(first, false);
END
$$;

-- What pgidem.outcome_of returns: a task's state and its recorded outcome.
CREATE TYPE pgidem.task_outcome AS (
    task_id         bigint,
    task_name       text,
    idempotency_key text,
    state           text,
    attempts        integer,
    max_attempts    integer,
    outcome_state   text,
    result          jsonb,
    error           jsonb,
    finished_at     timestamptz
);

-- The state and outcome of a task by id: one row, none for an unknown (or pruned) id.
-- outcome_state is `succeeded` (result holds the handler's return value) or `dead` (error holds
-- the final error); NULL while the task has not finished (or was cancelled).
CREATE FUNCTION pgidem.outcome_of(task_id bigint) RETURNS SETOF pgidem.task_outcome
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.task_name, t.idempotency_key, t.state, t.attempts, t.max_attempts,
           o.state, o.result, o.error, t.finished_at
      FROM pgidem.tasks t
      LEFT JOIN pgidem.outcomes o ON o.task_id = t.id
     WHERE t.id = $1
$$;

-- The same by (task name, idempotency key), the way enqueue dedupes.
CREATE FUNCTION pgidem.outcome_of(task_name text, idempotency_key text)
RETURNS SETOF pgidem.task_outcome
LANGUAGE sql STABLE AS $$
    SELECT t.id, t.task_name, t.idempotency_key, t.state, t.attempts, t.max_attempts,
           o.state, o.result, o.error, t.finished_at
      FROM pgidem.tasks t
      LEFT JOIN pgidem.outcomes o ON o.task_id = t.id
     WHERE t.task_name = $1 AND t.idempotency_key = $2
$$;

-- One batch of pruning: finished tasks older than the retention (their attempts, outcomes,
-- steps and step calls go by cascade) and once keys older than it, each at most batch_size,
-- oldest first, SKIP LOCKED (a row someone holds is left for the next batch, never waited for).
-- Returns how many of each went. Call it in autocommit, one short transaction per batch, until
-- both are below batch_size. After it, a pruned task's idempotency key can be used again.
CREATE FUNCTION pgidem.prune_batch(older_than interval DEFAULT NULL, batch_size integer DEFAULT 1000)
RETURNS TABLE (tasks_deleted integer, once_keys_deleted integer)
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - coalesce(prune_batch.older_than, pgidem.key_retention());
BEGIN
    IF prune_batch.batch_size IS NULL OR prune_batch.batch_size NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'invalid batch_size %: it must be between 1 and 100000',
            prune_batch.batch_size
            USING ERRCODE = 'PI002', COLUMN = 'batch_size';
    END IF;
    IF prune_batch.older_than IS NOT NULL AND prune_batch.older_than < interval '0' THEN
        RAISE EXCEPTION 'invalid older_than %: it must not be negative', prune_batch.older_than
            USING ERRCODE = 'PI002', COLUMN = 'older_than';
    END IF;
    WITH victims AS (
        SELECT t.id FROM pgidem.tasks t
         WHERE t.state IN ('succeeded', 'dead', 'cancelled') AND t.finished_at < cutoff
         ORDER BY t.finished_at
         LIMIT prune_batch.batch_size
           FOR UPDATE SKIP LOCKED
    )
    DELETE FROM pgidem.tasks t USING victims v WHERE t.id = v.id;
    GET DIAGNOSTICS tasks_deleted = ROW_COUNT;
    WITH victims AS (
        SELECT k.key FROM pgidem.once_keys k
         WHERE k.created_at < cutoff
         ORDER BY k.created_at
         LIMIT prune_batch.batch_size
           FOR UPDATE SKIP LOCKED
    )
    DELETE FROM pgidem.once_keys k USING victims v WHERE k.key = v.key;
    GET DIAGNOSTICS once_keys_deleted = ROW_COUNT;
    RETURN NEXT;
END
$$;

-- pgidem.prune (from 0001), now counting once keys too: it returns how many rows went (tasks
-- plus once keys), so that "call it until it returns 0" also empties the ledger of old keys
-- (in 0001 a run could stop with old once keys left behind).
CREATE OR REPLACE FUNCTION pgidem.prune(older_than interval DEFAULT NULL,
                                        batch_size integer DEFAULT 1000)
RETURNS integer
LANGUAGE sql AS $$
    SELECT b.tasks_deleted + b.once_keys_deleted FROM pgidem.prune_batch($1, $2) b
$$;
