"""What an operator touches: the status server and page, metrics, and the commands beside ``run``.

``status`` serves ``/status``, ``/healthz`` and ``/metrics`` (``metrics`` keeps the counters);
``statuscmd`` reads them for ``jfsync status``/``retry-dead``; ``check``, ``watch``, ``demo`` and
``resetcmd`` are the commands of those names, ``initcmd`` is ``jfsync init``. Nothing in the
replication core imports from here.
"""
