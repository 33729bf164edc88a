-- migrate: no-transaction
-- Which responder certificate signed each stored response (first 8 bytes of its SHA-256,
-- signed 64-bit; NULL for rows written before this column existed). After a responder key
-- rollover the refresher finds the rows an old responder signed through this index.
-- Adding a nullable column without a default is instant; the index is built CONCURRENTLY
-- so that recording and serving continue meanwhile. Both statements are idempotent.
ALTER TABLE responses ADD COLUMN IF NOT EXISTS signer bigint;
CREATE INDEX CONCURRENTLY IF NOT EXISTS responses_issuer_signer ON responses (issuer_id, signer);
