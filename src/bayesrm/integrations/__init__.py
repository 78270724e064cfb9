"""Adapters from bayesrm reward models to training libraries (each imports its library lazily or not at all)."""

from bayesrm.integrations.trl import RewardFunction

__all__ = ["RewardFunction"]
