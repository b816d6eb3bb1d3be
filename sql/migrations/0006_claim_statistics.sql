-- 0006_claim_statistics: statistics on which tasks are in which state, for the claim's plan.
--
-- The claim reads queued tasks of a queue in tasks_claimable's order and stops after its
-- limit, unless the planner expects fewer rows than the limit: then it reads every queued row
-- (through tasks_scheduled) and sorts them. Its expectation multiplies the share of the state,
-- the queue and the task name, each over the whole table, as if they were independent. With
-- 500,000 finished tasks of another name in the history and 20,000 queued, it expected 262
-- rows for a claim of 500, read 16,500 and sorted them: a claim took 16 ms instead of 11, and
-- a drain of no-op tasks in batches of 500 went from about 20,400 to 17,000 tasks/s.
-- Multivariate MCV statistics on the three columns give it their combinations (refreshed by
-- ANALYZE and autovacuum like the others).
CREATE STATISTICS pgidem.tasks_state_queue_task_name (mcv) ON state, queue, task_name
    FROM pgidem.tasks;
ANALYZE pgidem.tasks;
