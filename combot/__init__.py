"""Combot: a self-hosted study server for chatbot experiments with human participants."""

__version__ = "0.1.0"
