"""The WebSocket side.

The protocol (`protocol`), one stream's state (`session`) and tasks (`connection`), the server
(`server`), its metrics (`metrics`) and the client (`client`).
"""
