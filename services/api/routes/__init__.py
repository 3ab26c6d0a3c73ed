"""One ``APIRouter`` per resource; :mod:`services.api.app` mounts them."""
