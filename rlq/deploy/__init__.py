"""Deployment of low-bit policies: integer reference math (numpy). Imports numpy only, never torch."""
