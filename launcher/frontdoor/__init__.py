"""The front door: OpenAI-compatible routes that start a model on its first request and stop it when idle."""
