-- migrate: no-transaction
-- migrate: expand
-- Online-safe (docs/migrations.md): the index is built CONCURRENTLY (no lock that blocks
-- INSERTs or the refresher's UPDATEs) and the statement is idempotent, so an interrupted
-- run is simply run again. Expand-only: a build uses it once it is there (it looks when
-- the refresher starts) and runs as before when it is not.

-- The refresher finds due responses by nextUpdate (responses_next_update). A response
-- signed under a longer response_validity than the one configured now (an operator
-- lowered it) is due by BR 4.9.10 four days after its thisUpdate, long before
-- nextUpdate - refresh_margin: without this index the refresher reached such a row only
-- then, days late, unless a client asked for it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS responses_this_update ON responses (this_update);
