"""Server-side detectors: rules, their pure logic, per-run state and alert delivery."""
