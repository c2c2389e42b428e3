"""The fake AWS endpoint."""
