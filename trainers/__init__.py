"""Trainer subclasses and their configs (imports hf_ens, never the reverse)."""
