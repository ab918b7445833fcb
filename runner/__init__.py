"""runner: control plane (CLI, config, coordinator, wire protocol, deploy). Imports no MLX at module level."""

__version__ = "0.1.0"
