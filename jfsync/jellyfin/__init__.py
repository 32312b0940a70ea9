"""The Jellyfin wire protocol: REST client, websocket connection and the wire models."""
