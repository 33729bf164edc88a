-- migrate: expand
-- Online-safe (docs/migrations.md): a nullable column without a default is a catalog-only
-- change (ACCESS EXCLUSIVE on certificates for milliseconds, under lock_timeout);
-- idempotent. Expand-only: this build uses the column when it is there (it looks when it
-- connects) and records as before when it is not, so migrate and roll out in either order.

-- SHA-256 of the recorded certificate's TBSCertificate without the CT poison and SCT list
-- extensions (signer/der.py tbs_without_ct_extensions): the same for a precertificate and
-- its final certificate, different for any other certificate. Recording the serial again
-- with another fingerprint is a serial collision (BR 7.1, RFC 5280 4.1.2.2) and is
-- refused. NULL for rows recorded before this migration: the next recording of the serial
-- fills it.
ALTER TABLE certificates ADD COLUMN IF NOT EXISTS tbs_sha256 bytea;
