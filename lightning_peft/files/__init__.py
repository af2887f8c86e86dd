"""Adapter files: reading and writing the formats lightning-peft knows."""
