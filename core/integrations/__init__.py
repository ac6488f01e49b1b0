"""Layer 4, integrations: Redis Streams, the database and transactional outbox, rate limits; they plug into the runtime through hooks."""
