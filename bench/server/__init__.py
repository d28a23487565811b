"""Server bench: what the WebSocket server adds on top of the speech source."""
