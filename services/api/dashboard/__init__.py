"""The admin dashboard: HTML shells and plain ES modules that read the ``/v1`` JSON API.

No build step and nothing from a CDN: the pages, scripts and styles are the
files under ``templates/`` and ``static/``, served by the API itself
(:func:`install` adds the routes and the static mount). See docs/dashboard.md.
"""

from __future__ import annotations

from services.api.dashboard.routes import install, router

__all__ = ["install", "router"]
