"""The coordinator: the public Generation API, routing and the speculation loop."""
