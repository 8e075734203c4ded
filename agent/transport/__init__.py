"""Agent transports: how batches leave the process (memory, file, HTTP, websocket)."""
