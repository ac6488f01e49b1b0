"""Cross-cutting basics every layer uses: settings, MQTT string rules, trace context, error classes, backoff, logging."""
