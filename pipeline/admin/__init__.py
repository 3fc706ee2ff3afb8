"""The admin endpoint: reads state (Redis, the spool's disk). The one thing it writes is /readyz's
probe, an empty file created and removed in the spool's tmp dir to prove the spool is writable.

``routes`` declares every route, ``server`` serves them, ``status`` gathers the /status document.
"""
