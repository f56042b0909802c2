"""pacsnode: a DICOM-native PACS integration node."""

__version__ = "0.1.0"
