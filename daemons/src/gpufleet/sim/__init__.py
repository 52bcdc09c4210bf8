"""gpufleet-vllm-sim: a stand-in for vLLM's OpenAI-compatible server.

Same endpoints, response shapes and metric names as vLLM, with a latency model, a FIFO
scheduler bounded by ``--max-num-seqs`` and fault injection. See docs/simulator.md.
"""

# What /version reports: the vLLM release whose API shapes the simulator follows.
VLLM_COMPAT_VERSION = "0.10.1"
