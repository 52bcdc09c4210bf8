"""gpufleet-router: one OpenAI-compatible endpoint in front of the fleet's vLLM workers."""
