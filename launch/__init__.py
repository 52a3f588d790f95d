"""Launch tooling: Cloud TPU VMs/pods (`python -m launch.tpu`) and sweeps (`python -m launch.sweep`); see README.md."""
