-- podrouter catalog: the source of truth for pods, tenants and their routes, roles, and the
-- audit log. Routers build their RoutingTable from these tables and learn of changes through
-- NOTIFY podrouter_routes.

CREATE TABLE pods (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    primary_url text NOT NULL,
    replicas    jsonb NOT NULL DEFAULT '[]',
    http        jsonb NOT NULL DEFAULT '[]',
    weight      double precision NOT NULL DEFAULT 1 CHECK (weight > 0),
    accepting   boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Client roles. Only SCRAM-SHA-256 verifiers are stored, never a password.
CREATE TABLE roles (
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    verifier   text NOT NULL CHECK (verifier LIKE 'SCRAM-SHA-256$%'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A tenant is one database on one pod. route_version grows by one at every route change.
CREATE TABLE tenants (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    pod           text NOT NULL REFERENCES pods (name),
    route_version bigint NOT NULL DEFAULT 1,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('creating', 'active', 'paused', 'moving', 'deleting')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenants_pod ON tenants (pod);

-- Which roles may reach which tenants.
CREATE TABLE tenant_grants (
    tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    role   text NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    PRIMARY KEY (tenant, role)
);

CREATE TABLE audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
