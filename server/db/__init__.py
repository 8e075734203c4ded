"""gradwatch.server.db."""
