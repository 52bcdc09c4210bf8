-- gpufleet control plane schema, version 1.
-- Secrets (worker tokens, API keys) are stored only as SHA-256 hex plus a short prefix.

CREATE TABLE instances (
    instance_id          text PRIMARY KEY,
    provider_instance_id text,
    hostname             text,
    model_id             text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    retired_at           timestamptz
);

CREATE TABLE worker_auth_tokens (
    instance_id  text PRIMARY KEY REFERENCES instances (instance_id) ON DELETE CASCADE,
    token_hash   text NOT NULL UNIQUE,
    token_prefix text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    rotated_at   timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE workers (
    worker_id                  text PRIMARY KEY,
    instance_id                text NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
    provider_instance_id       text,
    model_id                   text NOT NULL,
    advertise_url              text NOT NULL,
    agent_url                  text NOT NULL,
    tensor_parallel_size       integer NOT NULL DEFAULT 1,
    gpu_memory_utilization     double precision,
    gpus                       jsonb NOT NULL DEFAULT '[]'::jsonb,
    agent_version              text,
    -- what the worker says (starting | ready | draining) and what the operator asks
    status                     text NOT NULL DEFAULT 'starting',
    desired_status             text,
    -- the last heartbeat's figures
    queue_depth                integer NOT NULL DEFAULT 0,
    running                    integer NOT NULL DEFAULT 0,
    kv_cache_usage             double precision NOT NULL DEFAULT 0,
    gpu_util                   double precision NOT NULL DEFAULT 0,
    gpu_mem_used_mb            double precision NOT NULL DEFAULT 0,
    ttft_p95_ms                double precision NOT NULL DEFAULT 0,
    e2e_p95_ms                 double precision NOT NULL DEFAULT 0,
    req_per_s                  double precision NOT NULL DEFAULT 0,
    inflight                   integer NOT NULL DEFAULT 0,
    last_heartbeat_at          timestamptz,
    -- the reconciler's readyz probes
    last_probe_at              timestamptz,
    last_probe_ok              boolean,
    consecutive_probe_failures integer NOT NULL DEFAULT 0,
    last_probe_error           text,
    registered_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workers_status_check CHECK (status IN ('starting', 'ready', 'draining')),
    CONSTRAINT workers_desired_status_check CHECK (desired_status IS NULL OR desired_status IN ('ready', 'draining'))
);
CREATE INDEX workers_instance_id_idx ON workers (instance_id);
CREATE INDEX workers_model_id_idx ON workers (model_id);

CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    name       text NOT NULL,
    key_hash   text NOT NULL UNIQUE,
    key_prefix text NOT NULL,
    models     text[] NOT NULL DEFAULT '{}',
    rpm        integer NOT NULL DEFAULT 0 CHECK (rpm >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE TABLE scaling_decisions (
    decision_id      bigserial PRIMARY KEY,
    model_id         text NOT NULL,
    decided_at       timestamptz NOT NULL DEFAULT now(),
    current_replicas integer NOT NULL,
    desired_replicas integer NOT NULL,
    action           text NOT NULL,          -- none | scale_up | scale_down
    reason           text NOT NULL,
    inputs           jsonb NOT NULL DEFAULT '{}'::jsonb,
    drain_worker_id  text,
    actuator         text,
    actuation_ok     boolean,
    actuation_error  text
);
CREATE INDEX scaling_decisions_model_time_idx ON scaling_decisions (model_id, decided_at DESC);
