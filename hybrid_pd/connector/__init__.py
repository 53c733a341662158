"""The vLLM integration: ``HybridNixlConnector`` (our worker behind upstream's pull
connector), the vLLM-to-planner block-id mapping, the checked upstream contract and the
spans from inside the engines."""
