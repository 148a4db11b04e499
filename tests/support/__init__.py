"""Real services for tests: NATS, an OCI registry, test images. Each stops what it starts."""
