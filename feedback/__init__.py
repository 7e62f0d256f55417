"""The feedback service: impressions, clicks, carts and purchases in; durable events, live session features and blend weights out.
Serving code: it imports the contract, rpc plumbing and the event log, never the gateway or training."""
