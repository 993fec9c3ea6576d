"""XMAG distillation: losses, projectors, train state, optimizer and the sharded train step."""
