"""Layer 1, transport: the MQTT client (network thread, callbacks, acks, wire checks, properties), orphan notices, the embedded broker."""
