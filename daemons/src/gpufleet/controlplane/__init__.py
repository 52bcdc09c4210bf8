"""The control plane: worker registration and heartbeats, the admin API, the reconciler
that publishes routable workers to Redis, and the scaling loop. See docs/controlplane.md."""
