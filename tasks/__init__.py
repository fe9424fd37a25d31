"""Task families, one module per family. They depend only on ``learnopt.task``."""
