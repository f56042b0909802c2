"""Image analysis: numpy in, numpy out. No networking and no database here."""

from pathlib import Path

#: The models shipped in the package, one folder per task (``lungs``, ``region``), each
#: with its model file and its JSON card; ``pacsnode train --task T`` writes them.
MODELS_DIR = Path(__file__).resolve().parent / "models"
