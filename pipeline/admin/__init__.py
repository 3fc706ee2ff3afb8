"""The admin endpoint: reads state (Redis, the spool's disk), writes nothing."""
