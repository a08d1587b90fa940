-- Routers sharing this catalog. Each router inserts its row at start and holds the session
-- advisory lock (0x706f6472, id) on a catalog connection of its own for as long as it runs, so
-- "live" is exact: a killed router's lock goes with its connection, whatever its last
-- `seen_at`. Rows of routers that are gone are pruned by the next router to start.
CREATE TABLE routers (
    id          serial PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    listen      text,
    admin       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- The router running a job (routers.id; no foreign key, the row goes when the router does).
-- A job whose owner is not live is recovered (finished or rolled back) by a live router.
ALTER TABLE jobs ADD COLUMN owner integer;

-- A move's pause, held on every live router before the cutover fences the source: the mover
-- inserts the row and notifies `podrouter_pauses`; every other router pauses the tenant's
-- gate, waits for its running transactions to end and acknowledges; at the end the mover
-- sets `ended_at` (and the route version to follow) and notifies again. A router that never
-- hears the end lets go at `expires_at`.
CREATE TABLE move_pauses (
    id             bigserial PRIMARY KEY,
    tenant         text NOT NULL,
    job            bigint,
    origin         integer NOT NULL,
    expires_at     timestamptz NOT NULL,
    ended_at       timestamptz,
    route_version  bigint
);
CREATE INDEX move_pauses_open ON move_pauses (id) WHERE ended_at IS NULL;

CREATE TABLE move_pause_acks (
    pause    bigint NOT NULL REFERENCES move_pauses (id) ON DELETE CASCADE,
    router   integer NOT NULL,
    drained  boolean NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pause, router)
);
