"""Phone calls: a SIP user agent server with RTP, and provider media-stream websockets (Twilio)."""
