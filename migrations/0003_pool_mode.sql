-- Pool mode per pod (default for its tenants) and per tenant (override); NULL = inherit.
ALTER TABLE pods ADD COLUMN pool_mode text CHECK (pool_mode IN ('session', 'transaction'));
ALTER TABLE tenants ADD COLUMN pool_mode text CHECK (pool_mode IN ('session', 'transaction'));
