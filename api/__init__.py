"""The FastAPI application: routers per resource, dashboard, metrics."""
