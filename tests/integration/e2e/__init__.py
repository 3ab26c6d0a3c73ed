"""End-to-end tests on the whole service: a real API server, workers and finished runs."""
