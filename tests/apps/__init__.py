"""Test applications the integration tests serve (``server_factory(app="tests.apps.X:app")``)."""
