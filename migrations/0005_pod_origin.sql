-- Where a pod came from: 'config' (listed in pods.toml: a config reload adds, updates and
-- removes it) or 'api' (added with POST /v1/pods or by a pod provider: only the admin API
-- removes it, and reloads leave it alone). Pods that exist before this migration came from
-- the config; rows inserted without an origin from now on are the API's.
ALTER TABLE pods ADD COLUMN origin text NOT NULL DEFAULT 'config'
    CHECK (origin IN ('config', 'api'));
ALTER TABLE pods ALTER COLUMN origin SET DEFAULT 'api';

-- One unfinished drain per pod (a second `POST /v1/pods/{pod}/drain` is a conflict).
CREATE UNIQUE INDEX jobs_one_drain_per_pod ON jobs (pod)
    WHERE kind = 'drain' AND state IN ('pending', 'running');
