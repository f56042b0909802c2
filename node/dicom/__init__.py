"""DICOM networking: the listener (SCP), its reactor and fast C-STORE path, the byte-level
codec, the client side (SCU) and the DIMSE statuses we answer with."""
