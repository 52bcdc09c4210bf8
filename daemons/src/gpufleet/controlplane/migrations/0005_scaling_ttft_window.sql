-- The p95 TTFT over the agent's scaling window (SCALING_TTFT_WINDOW_S, default 20 s), which the
-- scaling loop reads instead of the display window's ttft_p95_ms; NULL from older agents.
ALTER TABLE workers ADD COLUMN ttft_p95_scaling_ms double precision;
