-- migrate: no-transaction
-- migrate: expand
-- Online-safe (docs/migrations.md): a nullable column without a default is a catalog-only
-- change (ACCESS EXCLUSIVE for milliseconds, under lock_timeout), and the index is built
-- CONCURRENTLY (no lock that blocks INSERTs). Both statements are idempotent, so an
-- interrupted run is simply run again. Expand-only: serve does not rely on either yet.

-- When the CT index first saw this (issuer, serial): NULL until a CT follower fills it.
-- Lets monitoring find certificates the CA recorded but never logged, and vice versa.
ALTER TABLE certificates ADD COLUMN IF NOT EXISTS ct_first_seen timestamptz;

-- Expiry scans (pruning expired certificates, skipping them when re-signing) without
-- reading the whole table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS certificates_not_after ON certificates (not_after);
