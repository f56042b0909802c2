"""IHE ATNA audit messages (DICOM PS3.15 A.5) sent over syslog: :mod:`node.audit.atna`
is the API the rest of the node calls, :mod:`node.audit.messages` builds the XML."""
