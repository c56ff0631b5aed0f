"""HTTP front door: Anthropic Messages + OpenAI-compatible APIs (see docs/api.md)."""
