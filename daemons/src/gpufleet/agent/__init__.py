"""gpufleet-agent: the sidecar next to vLLM on each GPU worker.

It registers the worker with the control plane (enrolling once with its join secret), sends
heartbeats, answers ``/readyz`` from live checks of vLLM, and exports GPU and vLLM
metrics. It never proxies inference traffic. See docs/agent.md.
"""
