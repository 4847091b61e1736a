"""Glue to training frameworks (Hugging Face transformers)."""
