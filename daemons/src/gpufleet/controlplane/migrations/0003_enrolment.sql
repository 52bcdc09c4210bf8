-- Enrolment (issue 9): join secrets, and worker tokens bound to the instance's declared
-- model and worker ids.

-- One-time join secrets: at most one per instance (a new one replaces an unused one),
-- stored as SHA-256 hex plus a display prefix, expiring, used once.
CREATE TABLE join_secrets (
    instance_id   text PRIMARY KEY REFERENCES instances (instance_id) ON DELETE CASCADE,
    secret_hash   text NOT NULL UNIQUE,
    secret_prefix text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);

-- The worker ids an instance may register (a worker id belongs to one instance only).
CREATE TABLE instance_workers (
    worker_id   text PRIMARY KEY,
    instance_id text NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE
);
CREATE INDEX instance_workers_instance_id_idx ON instance_workers (instance_id);

-- Existing rows: an instance declares the worker ids it has registered, or its own id
-- when it has none; its model is the one its workers serve when they agree. Instances
-- still without a model take the model of their first enrolment (docs/controlplane.md,
-- "Upgrading to join secrets").
INSERT INTO instance_workers (worker_id, instance_id)
    SELECT worker_id, instance_id FROM workers
    ON CONFLICT (worker_id) DO NOTHING;
INSERT INTO instance_workers (worker_id, instance_id)
    SELECT i.instance_id, i.instance_id FROM instances i
    WHERE NOT EXISTS (SELECT 1 FROM instance_workers d WHERE d.instance_id = i.instance_id)
    ON CONFLICT (worker_id) DO NOTHING;
UPDATE instances i SET model_id = w.model_id
    FROM (SELECT instance_id, min(model_id) AS model_id FROM workers GROUP BY instance_id
          HAVING count(DISTINCT model_id) = 1) w
    WHERE i.instance_id = w.instance_id AND i.model_id IS NULL;

