"""specdec Kubernetes operator (kopf). Imports no torch."""
