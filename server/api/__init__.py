"""gradwatch.server.api."""
