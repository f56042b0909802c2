"""Generated CT phantoms (and their DICOM series) for tests, benchmarks and training.

Never imported by the running node.
"""
