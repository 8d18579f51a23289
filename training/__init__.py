"""QLoRA fine-tuning stack: recipe, presets, data, sidecars (gpu_monitor, backup, status)."""

__version__ = "0.1.0"
