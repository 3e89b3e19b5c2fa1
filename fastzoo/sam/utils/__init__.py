"""Helpers for automatic mask generation."""
