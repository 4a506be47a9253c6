"""The clapq embedding worker (Celery). Nothing here imports torch at import time."""
