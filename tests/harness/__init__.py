"""Test harness for vigie's integration tests: Synapse, the agent, a counting Matrix client."""
