"""gradwatch server: ingest, storage and the REST API (FastAPI + SQLAlchemy)."""
