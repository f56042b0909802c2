"""Stable -> route -> job -> deliver: when a study is complete, which pipeline each series
gets, the jobs that run them in worker processes, and the sending of their results."""
