-- Every config a router applied (at start when it differs from the latest one, and at each
-- reload), verbatim, with its hash and the field-by-field diff from the one before, so an
-- older config is never lost (seed 004).

CREATE TABLE config_versions (
    version    bigserial PRIMARY KEY,
    hash       text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    applied_at timestamptz NOT NULL DEFAULT now(),
    forced     boolean NOT NULL DEFAULT false,
    config     text NOT NULL,
    -- [{"field", "old", "new"}], passwords in URLs redacted
    diff       jsonb NOT NULL DEFAULT '[]'
);
