"""The admin endpoint (``--admin``): what an operator reads of a running tunnelkit.

``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` (orchestrators),
``/status`` (a page for people) and ``/status.json`` (what the page reads).
Every answer is made from one :class:`~tunnelkit.admin.snapshot.Snapshot`,
read from the live objects at request time (:mod:`tunnelkit.admin.observe`),
or with ``--workers N`` gathered from every worker by the supervisor
(:mod:`tunnelkit.admin.workers`). See docs/admin.md.
"""
