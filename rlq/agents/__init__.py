"""Agents. Importing this package registers every built-in agent."""
from rlq.agents.base import Agent, UpdateOut, agent_names, make_agent, register
from rlq.agents import dqn  # noqa: F401  (registers dqn)

__all__ = ["Agent", "UpdateOut", "agent_names", "make_agent", "register"]
