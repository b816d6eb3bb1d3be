-- 0007_history_cascade: attempts and outcomes go with their task by a statement-level trigger,
-- not by a foreign key.
--
-- A foreign key checks every inserted row with a query of its own (RI_FKey_check_ins: an SPI
-- `SELECT 1 FROM pgidem.tasks WHERE id = $1 FOR KEY SHARE`). Every claimed task inserts an
-- attempt and every finished task an outcome, so a drain paid two such checks per task, about
-- 9 us of the server's 50 us per no-op task on the 2-core machine. They checked nothing that
-- can fail: pgidem inserts an attempt or an outcome only in the statement or transaction that
-- holds its task's row locked (the claim's and the completions' UPDATE ... RETURNING, the
-- completion's FOR UPDATE, task_mark_succeeded's UPDATE before task_record_outcomes), so the
-- task exists and nothing can delete it before that transaction ends. Drains of 20,000 tasks,
-- 2 workers x 1 thread, batch 500, six alternating drains into two databases built alike but
-- for this migration, best of each (2026-12-04, 21:50 UTC): no-op 20,407 -> 22,323 tasks/s
-- (+9 %), one-row writes 11,880 -> 12,615 tasks/s (+6 %).
--
-- What the foreign keys' ON DELETE CASCADE did, the triggers do: a DELETE of tasks (pruning, or
-- anyone's DELETE in psql) deletes their attempts and outcomes in the same statement, with one
-- join over the deleted rows instead of two queries per row; a TRUNCATE of pgidem.tasks (which
-- still needs CASCADE for steps and step calls) empties pgidem.attempts and pgidem.outcomes
-- too. steps and step_calls keep their foreign keys: they are written by steps, not by every
-- task.
ALTER TABLE pgidem.attempts DROP CONSTRAINT attempts_task_id_fkey;
ALTER TABLE pgidem.outcomes DROP CONSTRAINT outcomes_task_id_fkey;

CREATE FUNCTION pgidem._tasks_deleted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    DELETE FROM pgidem.attempts a USING deleted_tasks d WHERE a.task_id = d.id;
    DELETE FROM pgidem.outcomes o USING deleted_tasks d WHERE o.task_id = d.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_deleted AFTER DELETE ON pgidem.tasks
    REFERENCING OLD TABLE AS deleted_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION pgidem._tasks_deleted();

CREATE FUNCTION pgidem._tasks_truncated() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    TRUNCATE pgidem.attempts, pgidem.outcomes;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_truncated AFTER TRUNCATE ON pgidem.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION pgidem._tasks_truncated();

