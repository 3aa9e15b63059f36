"""Inference engines behind the common Backend interface."""
