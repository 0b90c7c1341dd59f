"""One thin router per resource; `service.app.create_app()` wires them."""
