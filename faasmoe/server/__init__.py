"""The control plane: OpenAI-compatible API, tenants and quotas, and the engine that batches all tenants."""
