"""Route handlers, one module per area; app.routes() lists them all."""
