"""HTTP layer only: validation, SSE, metrics. The model lives in guidance.engine."""
