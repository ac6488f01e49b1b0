"""Layer 3, runtime: one process serving routes (the dispatcher, intake, ordering, retries and breakers, stats, events)."""
