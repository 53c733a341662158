"""Layout and descriptor planner (pure), NIXL executor, and the vLLM KV connector."""
