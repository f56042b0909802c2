"""pacsnode: a DICOM-native PACS integration node."""

__version__ = "0.1.0"

# Our implementation class UID, under pydicom's root for implementations without one
# of their own, and a version name (SH, at most 16 characters): in every association
# we take part in and in the file meta of every file we write.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10207.1"
IMPLEMENTATION_VERSION_NAME = f"PACSNODE_{__version__}"[:16]
