"""Passes that finish a graph for export."""
