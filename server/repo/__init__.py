"""gradwatch.server.repo."""
