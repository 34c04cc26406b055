"""Instances: the manager that creates, watches and deletes them, and what it uses (state, events,
readiness probes, ports, GPUs, memory, stop reasons, the directory lock)."""
