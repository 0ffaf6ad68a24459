"""The global policy actor, policy primitives, built-in policies and local enforcement (issue 4)."""
