"""`pipecat-orpheus eval`: a one-command speech-quality check of the engine (runner.py runs it)."""
