"""Receive -> store -> index: one C-STORE from its bytes to a durable file and its rows,
and the log of the associations that brought them."""
