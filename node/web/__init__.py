"""The web application: dashboard, studies, REST API, operations endpoints, access log.

It reads the database through the read model (:mod:`node.audit_queries`,
:mod:`node.web.read_model`) and never takes part in receiving: it runs in its own
thread beside a :class:`node.app.Node`, or alone (``pacsnode web``).
"""
