"""The instance API over HTTP: its routes, the OpenAPI document and wire schemas, the token check, the dashboard."""
