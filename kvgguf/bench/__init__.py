"""``kvgguf bench``: speed (and, later, accuracy and memory) measured as ratios within one run."""
