"""Layer 5, processes: assembling the app in a process, the supervisor and its workers, parked and orphaned sessions, autoscaling."""
