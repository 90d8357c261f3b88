"""FastAPI routers of the template service, one module per resource."""
# No "from __future__ import annotations": FastAPI reads the route annotations, and they
# refer to names local to the router factories.
