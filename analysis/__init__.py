"""Image analysis: numpy in, numpy out. No networking and no database here."""
