"""Descriptor planner: model spec -> engine layout -> per-request read plan.

Pure: imports neither vLLM, NIXL nor torch (numpy only), so it runs anywhere and the
reference resharder in the tests can check it byte for byte."""
