-- migrate: expand
-- Online-safe (docs/migrations.md): a nullable column without a default is a catalog-only
-- change (ACCESS EXCLUSIVE on ct_index for milliseconds, under lock_timeout); idempotent.
-- Expand-only: this build uses the column when it is there (it looks at start) and runs
-- as before when it is not, so migrate and roll out in either order.

-- The notAfter of the logged (pre)certificate. A serial known only from CT had none, so
-- the refresher kept re-signing its response forever, and expired_retention never applied
-- to it. NULL for rows indexed before this migration (and for a Validity that does not
-- parse): such serials stay in the refresh cycle, as before.
ALTER TABLE ct_index ADD COLUMN IF NOT EXISTS not_after timestamptz;
