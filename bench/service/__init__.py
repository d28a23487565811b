"""Pipecat service bench: many `OrpheusTTSService` pipelines in one bot process, against one shared engine."""
