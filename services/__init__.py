"""fitfleet's server-side processes (the HTTP API); never imports torch or workers."""
