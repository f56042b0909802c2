"""Training of the shipped models (``pacsnode train``): data, architectures, fitting.

Never imported by the running node.
"""
