"""``hybrid-pd serve``: a prefill engine, a decode engine and the P/D proxy on one machine.

* :mod:`.engines` -- the ``vllm serve`` command, environment and ``--kv-transfer-config``
  of each engine (pure, unit-tested);
* :mod:`.supervisor` -- child processes: start, health, logs, stop every process group;
  and the P/D cluster (P, D, proxy) built from them;
* :mod:`.cli` -- the ``serve`` arguments (shared with ``hybrid-pd demo``) and the command;
* :mod:`.proxy` -- the OpenAI-compatible proxy (P, then D), with its engine calls in
  :mod:`.proxy_calls`.

Nothing here imports vLLM: the engines are child processes.
"""
