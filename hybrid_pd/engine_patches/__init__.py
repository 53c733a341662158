"""Small, named, version-guarded patches applied inside vLLM processes.

Every patch lives in one module, names the upstream issue or gap it closes, checks the
vLLM version and its target's signature before touching it, and can be reverted.
``registry.apply_all()`` runs in every vLLM process through the ``vllm.general_plugins``
entry point (``plugin.register``); ``hybrid-pd patches`` lists them with their status.
"""
