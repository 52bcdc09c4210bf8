"""gpufleet: GPU VMs behind one OpenAI-compatible endpoint."""

__version__ = "0.2.0"
