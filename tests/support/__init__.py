"""Test support shared by every test folder: each helper exists once, here.

``waiting.wait_until`` is the one way to wait (on an event, or loop turns, bounded in real
time); ``config`` builds every jfsync configuration (``make_config``, ``write_config``);
``cluster`` is the one emulator cluster (N emulators plus jfsync, the ``start_cluster``
fixture of ``tests/conftest.py``; the suites' ``make_cluster``/``make_stack`` are presets of
it); ``gate`` a proxy that can hold a server's frames; ``emulators`` starts bare emulators;
``openapi_requests`` is the pytest plugin checking jfsync's requests against the OpenAPI files.
"""
