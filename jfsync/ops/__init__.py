"""What an operator touches: the status server and page, metrics, alerts, the side commands.

``status`` serves the page (``page/``), ``/status``, ``/healthz`` and ``/metrics``, all built
from ``snapshot`` (what a running service exposes, through a small protocol); ``activity`` is
the feed of recent changes, ``alerts`` the notifications, ``metrics`` the counters;
``statuscmd`` reads the endpoint for ``jfsync status``/``retry-dead``; ``check``, ``watch``,
``demo``, ``resetcmd``, ``reconcilecmd`` and ``initcmd`` are the commands of those names.
Nothing in the replication core imports from here.
"""
