"""The broker: accepts connections, stores tasks, leases them to workers.

Contract: ``server.py`` owns sockets and TLS and turns frames into calls on
``service.BrokerService``, which holds all business logic (validation,
long-poll claims, waiters, notifications) once for every edge (wire now,
REST later). ``loops.py`` runs the timers (lease reaper, retry promoter,
worker liveness). May import: tq.core, tq.protocol, tq.store, tq.security,
trio. Never imports tq.cli.
"""
