"""The HTTP API: people submit experiment specs here and read their runs back.

Build the app with :func:`services.api.app.create_app`; nothing is created at
import time, so tests hand in their own settings (a temporary SQLite file, a
memory store).
"""
