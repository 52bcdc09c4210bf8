-- What the leading reconciler last did, so `gpufleet status` can show it is alive.
CREATE TABLE reconciler_state (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    leader          text NOT NULL,
    leader_since    timestamptz NOT NULL,
    last_cycle_at   timestamptz NOT NULL,
    last_cycle_ms   double precision NOT NULL DEFAULT 0,
    workers         integer NOT NULL DEFAULT 0,
    routable        integer NOT NULL DEFAULT 0
);
