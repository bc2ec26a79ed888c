"""Pure processing logic behind small ports: batching, versioned upserts, verification."""
