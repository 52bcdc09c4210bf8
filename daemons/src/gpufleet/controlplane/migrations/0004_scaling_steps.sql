-- The scaling loop as a persisted sequence (docs/controlplane.md, "Scaling loop").
--
-- A decision that acts moves through steps, each written before it starts, so a new
-- leader resumes it: scale_down: draining → actuating → done | failed;
-- scale_up: pending → actuating → done | failed; with the log actuator: advisory.
ALTER TABLE scaling_decisions
    ADD COLUMN step                  text,         -- NULL for "none" decisions
    ADD COLUMN step_changed_at       timestamptz,
    ADD COLUMN deadline_at           timestamptz,  -- of the current step (drain wait, actuation)
    ADD COLUMN owner                 text,         -- the reconciler (host:pid) running the step
    ADD COLUMN command_pgid          integer,      -- the command's process group, on the owner's host
    ADD COLUMN drain_inflight        integer,      -- the drained worker's last reported in-flight count
    ADD COLUMN outcome               text,         -- ok | failed | timed_out | advisory
    ADD COLUMN actuation_started_at  timestamptz,
    ADD COLUMN actuation_finished_at timestamptz,
    ADD COLUMN actuation_stdout      text,         -- bounded tails of the command's output
    ADD COLUMN actuation_stderr      text,         -- (or the webhook's answer)
    ADD COLUMN undrained             boolean,      -- a failed scale-down returned its worker
    -- consecutive identical-kind "none" decisions update one row; this counts them
    ADD COLUMN repeats               integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT scaling_decisions_step_check CHECK (step IS NULL OR step IN
        ('pending', 'draining', 'actuating', 'done', 'failed', 'advisory')),
    ADD CONSTRAINT scaling_decisions_outcome_check CHECK (outcome IS NULL OR outcome IN
        ('ok', 'failed', 'timed_out', 'advisory'));

-- rows of earlier versions: finished with what they recorded; one left without an outcome
-- (its reconciler stopped mid-actuation) is failed, so it blocks nothing
UPDATE scaling_decisions SET
    step = CASE WHEN actuator = 'log' THEN 'advisory' WHEN actuation_ok THEN 'done' ELSE 'failed' END,
    outcome = CASE WHEN actuator = 'log' THEN 'advisory' WHEN actuation_ok THEN 'ok' ELSE 'failed' END,
    actuation_error = CASE WHEN actuation_ok IS NULL AND actuator <> 'log'
                           THEN 'no outcome recorded (before migration 0004)' ELSE actuation_error END,
    step_changed_at = decided_at
WHERE action <> 'none';

-- never two unfinished scale actions of one model, whatever the number of reconcilers
CREATE UNIQUE INDEX scaling_decisions_one_unfinished_idx ON scaling_decisions (model_id)
    WHERE step IN ('pending', 'draining', 'actuating');

-- the policy's memory per model (scaling.ScalingState), written with each decision
CREATE TABLE scaling_state (
    model_id           text PRIMARY KEY,
    last_scale_up_at   double precision,  -- epoch seconds
    last_scale_down_at double precision,
    low_since          double precision,
    target_replicas    integer,
    backoff_action     text,
    backoff_until      double precision,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO scaling_state (model_id, last_scale_up_at, last_scale_down_at)
SELECT model_id,
       max(extract(epoch FROM decided_at)) FILTER (WHERE action = 'scale_up'),
       max(extract(epoch FROM decided_at)) FILTER (WHERE action = 'scale_down')
FROM scaling_decisions GROUP BY model_id;

-- the leading reconciler's scaling settings, for GET /v1/admin/scaling
CREATE TABLE scaling_settings (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    reconciler   text NOT NULL,
    settings     jsonb NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
