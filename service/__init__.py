"""The HTTP service: FastAPI app built by `service.app.create_app()`."""
