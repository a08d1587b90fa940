-- Long-running operations (moves, splits, rebalances, failovers) as jobs. A job's row is the
-- truth about it: a router that restarts finishes or rolls back the jobs it finds running,
-- using `checkpoint` (what the job has made so far: replication objects, fences, renames).
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('move', 'split', 'rebalance', 'drain', 'failover')),
    tenant       text,
    pod          text,
    params       jsonb NOT NULL DEFAULT '{}',
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    phase        text NOT NULL DEFAULT 'queued',
    progress     jsonb NOT NULL DEFAULT '{"done": 0, "total": 0, "unit": "steps"}',
    checkpoint   jsonb NOT NULL DEFAULT '{}',
    result       jsonb,
    error        text,
    parent       bigint REFERENCES jobs (id),
    actor        text NOT NULL DEFAULT 'podrouter',
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- One unfinished move per tenant.
CREATE UNIQUE INDEX jobs_one_move_per_tenant ON jobs (tenant)
    WHERE kind = 'move' AND state IN ('pending', 'running');
CREATE INDEX jobs_unfinished ON jobs (state) WHERE state IN ('pending', 'running');
