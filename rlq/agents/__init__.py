"""Agents. Importing this package registers every built-in agent."""
from rlq.agents.base import Agent, UpdateOut, agent_names, make_agent, register
from rlq.agents import dqn, eaudeqn, qensemble, sac  # noqa: F401  (registers the DQN family, EauDeQN, the Q-ensemble and the SAC agents)

__all__ = ["Agent", "UpdateOut", "agent_names", "make_agent", "register"]
