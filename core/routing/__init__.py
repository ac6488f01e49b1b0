"""Layer 2, routing: routes and their options, topic matching, handler arguments, payload decoding and validation, middleware, the context."""
