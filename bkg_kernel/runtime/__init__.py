"""Hosting plugins: inline in the gateway or in supervised worker processes."""
