"""pytest configuration: puts tests/ on sys.path, so test modules can import ``ocp_fixtures``."""
