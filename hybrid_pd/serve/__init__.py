"""``hybrid-pd serve``: a prefill engine, a decode engine and the P/D proxy on one machine
(or, with ``--role``, one engine per host behind ``hybrid-pd proxy``; docs/multi-host.md).

* :mod:`.engines` -- the ``vllm serve`` command, environment and ``--kv-transfer-config``
  of each engine (pure, unit-tested);
* :mod:`.supervisor` -- child processes: start, health, logs, stop every process group;
  and the P/D cluster (P, D, proxy) built from them, or one engine of it;
* :mod:`.cli` -- the ``serve`` arguments (shared with ``hybrid-pd demo``) and the command;
* :mod:`.proxy` -- the OpenAI-compatible proxy (P, then D), with its engine calls in
  :mod:`.proxy_calls`, its request rewriting in :mod:`.proxy_requests`, its pools of
  engines (health, metrics) in :mod:`.proxy_pool`, the choice among them in
  :mod:`.router` (pure) and its command in :mod:`.proxy_cli`.

Nothing here imports vLLM: the engines are child processes.
"""
