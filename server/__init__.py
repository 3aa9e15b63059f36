"""llm-endpoint HTTP server: config, schemas, routes, formatters."""
